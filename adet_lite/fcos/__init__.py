"""FCOS: backbone ``build_fcos_resnet_fpn_backbone``, proposal generator ``FCOS``, meta-arch ``OneStageDetector``."""
from .backbone import build_fcos_resnet_fpn_backbone
from .config import add_fcos_config
from .fcos import FCOS
from .head import FCOSHead
from .one_stage_detector import OneStageDetector
from .targets import compute_locations

__all__ = ["FCOS", "FCOSHead", "OneStageDetector", "add_fcos_config", "build_fcos_resnet_fpn_backbone",
           "compute_locations"]
