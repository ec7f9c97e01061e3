"""SOLO, Decoupled SOLO (+ Light) and SOLOv2 with Matrix NMS. Importing registers the meta-architectures
``SOLO`` and ``SOLOv2`` with Detectron2's META_ARCH_REGISTRY."""
from .config import add_solo_config
from .meta_arch import SOLO, SOLOv2
from .nms import mask_nms, matrix_nms, point_nms

__all__ = ["SOLO", "SOLOv2", "add_solo_config", "mask_nms", "matrix_nms", "point_nms"]
