"""Pieces shared by several methods (they exist once, here)."""
from .conv import conv_norm_relu, conv_norm_relu_reference_key
from .coords import coordinate_features
from .gt_masks import padded_bitmasks, semantic_targets
from .images import PixelNormalizationMixin
from .losses import dice_loss
from .mmdet_names import mmdet_resnet_fpn_key
from .postprocess import postprocess_full_image_masks
from .state_dict import ReferenceCheckpointMixin, rename_reference_keys
from .upsample import aligned_bilinear

__all__ = [
    "PixelNormalizationMixin",
    "ReferenceCheckpointMixin",
    "aligned_bilinear",
    "conv_norm_relu",
    "conv_norm_relu_reference_key",
    "coordinate_features",
    "dice_loss",
    "mmdet_resnet_fpn_key",
    "padded_bitmasks",
    "postprocess_full_image_masks",
    "rename_reference_keys",
    "semantic_targets",
]
