"""Shared part of the NL-RoI box / mask / keypoint heads: a stock Detectron2 head with an NL-RoI block
in front of it."""
from detectron2.layers import ShapeSpec

from d2ext.config_checks import check_values

from .block import NLRoIBlock
from .config import NL_ROI_REQUIREMENTS
from .input_extension import ExtendedInputConv2d, ExtendedInputLinear, extend_input


def nl_roi_args_from_config(cfg):
    """The keyword arguments of the NL-RoI heads that come from ``MODEL.NL_ROI``."""
    check_values(cfg.MODEL.NL_ROI, "MODEL.NL_ROI", NL_ROI_REQUIREMENTS)
    return {
        "nl_embed_channels": cfg.MODEL.NL_ROI.EMBED_CHANNELS,
        "nl_g_channels": cfg.MODEL.NL_ROI.G_CHANNELS,
        "nl_scale_affinity": cfg.MODEL.NL_ROI.SCALE_AFFINITY,
    }


class NLRoIHeadMixin:
    """Mixed into a stock head (an ``nn.Sequential`` of named layers) to run an NL-RoI block first.

    The stock layers keep their names and shapes (``conv1``, ``fc1``, ``mask_fcn1``, ``conv_fcn1``,
    ...), so model-zoo checkpoints load; the block is the child ``nl_roi`` and the first stock layer
    gains a zero-initialised ``nonlocal_weight`` for the Dg appended channels. Iterating the head
    yields the stock layers only; :meth:`layers_with_context` runs them as the stock heads do, giving
    the first one the block's non-local features next to the RoI features (``input_extension``).
    """

    def _add_nl_roi_block(self, input_shape: ShapeSpec, *, embed_channels: int, g_channels: int,
                          scale_affinity: bool):
        """Call at the end of ``__init__``, after the stock layers exist."""
        self.nl_roi = NLRoIBlock(
            input_shape.channels, embed_channels, g_channels, scale_affinity=scale_affinity
        )
        first_name, first_layer = next(
            (name, module) for name, module in self.named_children()
            if hasattr(module, "weight") and module is not self.nl_roi
        )
        spatial_size = (input_shape.height or 1) * (input_shape.width or 1)
        extended = extend_input(first_layer, g_channels, spatial_size)
        setattr(self, first_name, extended)
        for attribute in ("conv_norm_relus", "fcs"):  # the stock heads' lists of their layers
            layers = getattr(self, attribute, None)
            if layers is not None:
                setattr(self, attribute, [extended if layer is first_layer else layer for layer in layers])

    def __iter__(self):
        block = self._modules.get("nl_roi")
        return (module for module in self._modules.values() if module is not block)

    def layers_with_context(self, x, num_per_image):
        """The block, then the stock layers in order (as the stock heads' ``forward`` / ``layers``).

        Args:
            x: (N, D, H, W) pooled features of all RoIs of the batch, in image order.
            num_per_image: RoI count of each image (sums to N).
        """
        context = self.nl_roi.nonlocal_features(x, num_per_image)
        for layer in self:
            x = layer(x, context) if isinstance(layer, (ExtendedInputConv2d, ExtendedInputLinear)) else layer(x)
        return x


class NLRoIPerInstanceHeadMixin(NLRoIHeadMixin):
    """For the heads called as ``head(x, instances)`` (mask, keypoint): the per-image RoI counts are
    the lengths of ``instances``."""

    @classmethod
    def from_config(cls, cfg, input_shape):
        return {**super().from_config(cfg, input_shape), **nl_roi_args_from_config(cfg)}

    def forward(self, x, instances):
        """x: (N, D, H, W) pooled features of the RoIs of ``instances`` (concatenated in image order)."""
        # The stock forward calls ``self.layers(x)`` first: it gets the counts along with x.
        return super().forward((x, [len(i) for i in instances]), instances)

    def layers(self, features_and_counts):
        return self.layers_with_context(*features_and_counts)
