"""NL-RoI: non-local attention among the RoIs of one image in Mask R-CNN heads (Tseng et al., 2018),
plus Soft-NMS and box voting for Detectron2's R-CNN models. Importing it registers the heads."""
from .block import NLRoIBlock
from .box_head import NLRoIConvFCHead
from .box_voting import box_voting
from . import datasets  # noqa: F401  (registers the built-in dataset names)
from .config import add_nlroi_config
from .inference import PostprocessSettings, SoftNMSFastRCNNOutputLayers, fast_rcnn_inference_soft
from .keypoint_head import NLRoIKRCNNConvDeconvUpsampleHead
from .mask_head import NLRoIMaskRCNNConvUpsampleHead
from .roi_heads import NLRoICascadeROIHeads, NLRoIROIHeads
from .soft_nms import batched_soft_nms, soft_nms

__all__ = [
    "NLRoIBlock", "NLRoICascadeROIHeads", "NLRoIConvFCHead", "NLRoIKRCNNConvDeconvUpsampleHead",
    "NLRoIMaskRCNNConvUpsampleHead", "NLRoIROIHeads", "PostprocessSettings", "SoftNMSFastRCNNOutputLayers",
    "add_nlroi_config", "batched_soft_nms", "box_voting", "fast_rcnn_inference_soft", "soft_nms",
]
