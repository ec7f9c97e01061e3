"""FCOS, CondInst, BlendMask and SOLO / SOLOv2 in pure PyTorch on Detectron2.

Importing the package registers its models with Detectron2's registries.
"""
from . import blendmask, condinst, fcos, solo  # noqa: F401  (registration)
from .config import add_adet_lite_config
from .solo import matrix_nms

__all__ = ["add_adet_lite_config", "matrix_nms"]
