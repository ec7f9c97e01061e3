"""RDSNet: reciprocal object detection and instance segmentation, with MBRM (Wang et al., AAAI 2020).

Importing this package registers the ``RDSNet``, ``RDSNetFCOS`` (FCOS as the object stream; needs
adet_lite when built) and ``GeneralizedRCNNWithMBRM`` (Mask R-CNN with MBRM box refinement)
meta-architectures and the ``build_rdsnet_resnet_fpn_backbone`` backbone with Detectron2's registries.
"""
from . import backbone as _backbone  # noqa: F401  (registers build_rdsnet_resnet_fpn_backbone)
from .config import add_rdsnet_config
from .correlation import correlate
from .cropping import crop_axes, crop_masks, expanded_crop_boxes
from .fcos_object_stream import RDSNetFCOS
from .mask_loss import ohem_mask_loss
from .mbrm import MBRM
from .mbrm_postprocess import (GeneralizedRCNNWithMBRM, detector_postprocess_with_mbrm, pasted_mask_profiles,
                               refine_instances_with_mbrm)
from .rdsnet import RDSNet

__all__ = ["MBRM", "GeneralizedRCNNWithMBRM", "RDSNet", "RDSNetFCOS", "add_rdsnet_config", "correlate", "crop_axes",
           "crop_masks", "detector_postprocess_with_mbrm", "expanded_crop_boxes", "ohem_mask_loss",
           "pasted_mask_profiles", "refine_instances_with_mbrm"]
