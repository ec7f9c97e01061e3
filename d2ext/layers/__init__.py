"""Pieces shared by several methods (they exist once, here)."""
from .coords import coordinate_features
from .losses import dice_loss
from .postprocess import postprocess_full_image_masks
from .upsample import aligned_bilinear

__all__ = ["aligned_bilinear", "coordinate_features", "dice_loss", "postprocess_full_image_masks"]
