"""NL-RoI keypoint head: the NL-RoI block, then Detectron2's conv + deconv keypoint head."""
from detectron2.config import configurable
from detectron2.layers import interpolate
from detectron2.modeling.roi_heads import ROI_KEYPOINT_HEAD_REGISTRY, KRCNNConvDeconvUpsampleHead

from .head_mixin import NLRoIPerInstanceHeadMixin


@ROI_KEYPOINT_HEAD_REGISTRY.register()
class NLRoIKRCNNConvDeconvUpsampleHead(NLRoIPerInstanceHeadMixin, KRCNNConvDeconvUpsampleHead):
    """``KRCNNConvDeconvUpsampleHead`` with an NL-RoI block right after RoIAlign."""

    @configurable
    def __init__(self, input_shape, *, conv_dims, nl_embed_channels: int, nl_g_channels: int,
                 nl_scale_affinity: bool = False, **kwargs):
        """
        Args:
            input_shape: ShapeSpec of the pooled RoI features (D, H, W).
            conv_dims: as in ``KRCNNConvDeconvUpsampleHead``; needs at least one conv.
            nl_embed_channels, nl_g_channels, nl_scale_affinity: see :class:`NLRoIBlock`.
        """
        if len(conv_dims) < 1:
            raise ValueError("NLRoIKRCNNConvDeconvUpsampleHead needs MODEL.ROI_KEYPOINT_HEAD.CONV_DIMS non-empty.")
        super().__init__(input_shape, conv_dims=conv_dims, **kwargs)
        self._add_nl_roi_block(input_shape, embed_channels=nl_embed_channels, g_channels=nl_g_channels,
                               scale_affinity=nl_scale_affinity)

    def layers(self, features_and_counts):
        # The stock ``layers`` ends with this upsampling (heatmaps at twice the deconv's size); the
        # mixin's ``layers`` replaces it whole, so it is repeated here.
        x = super().layers(features_and_counts)
        return interpolate(x, scale_factor=self.up_scale, mode="bilinear", align_corners=False)
