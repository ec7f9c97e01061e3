"""FCOS, CondInst, BlendMask and SOLO / SOLOv2 in pure PyTorch on Detectron2.

Not built yet: this package only provides its config function (see the adet_lite issues).
"""
from .config import add_adet_lite_config

__all__ = ["add_adet_lite_config"]
