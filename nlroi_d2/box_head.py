"""NL-RoI box head: the NL-RoI block, then Detectron2's conv + fc box head."""
from typing import List, Optional

import torch
from detectron2.config import configurable
from detectron2.modeling.roi_heads import ROI_BOX_HEAD_REGISTRY, FastRCNNConvFCHead

from .head_mixin import NLRoIHeadMixin, nl_roi_args_from_config


@ROI_BOX_HEAD_REGISTRY.register()
class NLRoIConvFCHead(NLRoIHeadMixin, FastRCNNConvFCHead):
    """``FastRCNNConvFCHead`` (e.g. the GN head: 4 conv + 1 fc) with an NL-RoI block right after RoIAlign.

    Called as ``head(x, num_per_image)`` by :class:`nlroi_d2.NLRoIROIHeads`.
    """

    @configurable
    def __init__(self, input_shape, *, nl_embed_channels: int, nl_g_channels: int,
                 nl_scale_affinity: bool = False, **kwargs):
        """
        Args:
            input_shape: ShapeSpec of the pooled RoI features (D, H, W).
            nl_embed_channels, nl_g_channels, nl_scale_affinity: Df, Dg and the affinity scaling of
                the :class:`NLRoIBlock`.
            kwargs: the arguments of ``FastRCNNConvFCHead`` (conv_dims, fc_dims, conv_norm).
        """
        super().__init__(input_shape, **kwargs)
        self._add_nl_roi_block(input_shape, embed_channels=nl_embed_channels, g_channels=nl_g_channels,
                               scale_affinity=nl_scale_affinity)

    @classmethod
    def from_config(cls, cfg, input_shape):
        return {**super().from_config(cfg, input_shape), **nl_roi_args_from_config(cfg)}

    def forward(self, x: torch.Tensor, num_per_image: Optional[List[int]] = None) -> torch.Tensor:
        """
        Args:
            x: (N, D, H, W) pooled features of all RoIs of the batch, in image order.
            num_per_image: RoI count of each image (sums to N).

        Returns:
            (N, FC_DIM) or (N, C, H, W): the stock head's output.
        """
        if num_per_image is None:
            raise ValueError(
                "NLRoIConvFCHead needs the RoI count of each image: use MODEL.ROI_HEADS.NAME "
                "'NLRoIROIHeads' or 'NLRoICascadeROIHeads', which pass them."
            )
        return self.layers_with_context(x, num_per_image)  # FastRCNNConvFCHead.forward runs its layers only
