"""Pieces shared by several methods (they exist once, here)."""
from .conv import conv_norm_relu, conv_norm_relu_reference_key
from .conv_at_cells import conv3x3_at_cells, is_conv3x3
from .coords import NUM_QUADRATIC_COORDINATE_TERMS, coordinate_features, quadratic_coordinate_logits
from .fpn import LastLevelP6, fpn_top_block
from .gt_checks import check_gt_classes
from .gt_masks import ensure_gt_masks, mask_centroids, padded_bitmasks, semantic_targets
from .images import PixelNormalizationMixin, check_image_sizes, check_input_images
from .input_conventions import MSRA, TORCHVISION, check_input_conventions, input_convention_mismatches
from .losses import dice_loss, focal_loss_targets
from .mmdet_names import mmdet_resnet_fpn_key
from .parallel_towers import can_run_as_one, run_towers
from .postprocess import (capped_count, mask_bounding_boxes, postprocess_full_image_masks, postprocess_per_image,
                          resize_soft_masks, stable_argsort)
from .state_dict import (ReferenceCheckpointMixin, keys_reference_checkpoints_lack, register_empty_load_check,
                         rename_reference_keys)
from .upsample import aligned_bilinear

__all__ = [
    "LastLevelP6",
    "MSRA",
    "NUM_QUADRATIC_COORDINATE_TERMS",
    "PixelNormalizationMixin",
    "ReferenceCheckpointMixin",
    "TORCHVISION",
    "aligned_bilinear",
    "can_run_as_one",
    "capped_count",
    "check_gt_classes",
    "check_image_sizes",
    "check_input_conventions",
    "check_input_images",
    "conv_norm_relu",
    "conv_norm_relu_reference_key",
    "conv3x3_at_cells",
    "coordinate_features",
    "dice_loss",
    "ensure_gt_masks",
    "focal_loss_targets",
    "fpn_top_block",
    "input_convention_mismatches",
    "is_conv3x3",
    "keys_reference_checkpoints_lack",
    "mask_bounding_boxes",
    "mask_centroids",
    "mmdet_resnet_fpn_key",
    "padded_bitmasks",
    "postprocess_full_image_masks",
    "postprocess_per_image",
    "quadratic_coordinate_logits",
    "register_empty_load_check",
    "rename_reference_keys",
    "resize_soft_masks",
    "run_towers",
    "semantic_targets",
    "stable_argsort",
]
