"""Pieces shared by several methods (they exist once, here)."""
from .coords import coordinate_features
from .losses import dice_loss
from .postprocess import postprocess_full_image_masks

__all__ = ["coordinate_features", "dice_loss", "postprocess_full_image_masks"]
