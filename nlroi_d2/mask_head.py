"""NL-RoI mask head: the NL-RoI block, then Detectron2's conv + deconv mask head."""
from detectron2.config import configurable
from detectron2.modeling.roi_heads import ROI_MASK_HEAD_REGISTRY, MaskRCNNConvUpsampleHead

from .head_mixin import NLRoIPerInstanceHeadMixin


@ROI_MASK_HEAD_REGISTRY.register()
class NLRoIMaskRCNNConvUpsampleHead(NLRoIPerInstanceHeadMixin, MaskRCNNConvUpsampleHead):
    """``MaskRCNNConvUpsampleHead`` (e.g. 4 conv with GN + deconv) with an NL-RoI block right after RoIAlign.

    The RoIs of each image attend to each other: in training the foreground proposals of the image,
    at inference its detections.
    """

    @configurable
    def __init__(self, input_shape, *, conv_dims, nl_embed_channels: int, nl_g_channels: int,
                 nl_scale_affinity: bool = False, **kwargs):
        """
        Args:
            input_shape: ShapeSpec of the pooled RoI features (D, H, W).
            conv_dims: as in ``MaskRCNNConvUpsampleHead``; needs at least one conv before the deconv.
            nl_embed_channels, nl_g_channels, nl_scale_affinity: see :class:`NLRoIBlock`.
        """
        if len(conv_dims) < 2:
            raise ValueError("NLRoIMaskRCNNConvUpsampleHead needs MODEL.ROI_MASK_HEAD.NUM_CONV >= 1.")
        super().__init__(input_shape, conv_dims=conv_dims, **kwargs)
        self._add_nl_roi_block(input_shape, embed_channels=nl_embed_channels, g_channels=nl_g_channels,
                               scale_affinity=nl_scale_affinity)
