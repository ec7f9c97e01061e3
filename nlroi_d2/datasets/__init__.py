"""Loaders of the NL-RoI paper's datasets besides Cityscapes: KITTI instance segmentation, WildDash and
ScanNet 2D frames, as Detectron2 dicts with RLE masks (train with ``INPUT.MASK_FORMAT: bitmask``)."""
from .builtin import default_datasets_root, register_all_nlroi_datasets
from .kitti import load_kitti_instances, register_kitti_instances
from .scannet import load_scannet_instances, register_scannet_instances
from .wilddash import load_wilddash_instances, register_wilddash_instances

register_all_nlroi_datasets(default_datasets_root())

__all__ = [
    "load_kitti_instances", "load_scannet_instances", "load_wilddash_instances", "register_all_nlroi_datasets",
    "register_kitti_instances", "register_scannet_instances", "register_wilddash_instances",
]
