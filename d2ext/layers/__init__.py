"""Pieces shared by several methods (they exist once, here)."""
from .coords import coordinate_features
from .losses import dice_loss

__all__ = ["coordinate_features", "dice_loss"]
