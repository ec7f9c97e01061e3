"""Built-in names for the NL-RoI paper's datasets under ``$DETECTRON2_DATASETS`` (default ``datasets``),
as Detectron2 does for its own: registering reads nothing; loading a name whose folder is missing
raises an error that names the missing path and the expected layout.

==========================  ==================================================
name                        folder
==========================  ==================================================
kitti_instance_train        <datasets>/kitti/training
wilddash_instance_val       <datasets>/wilddash/wd_val_01
scannet_instance_train      <datasets>/scannet (scans of scannetv2_train.txt)
scannet_instance_val        <datasets>/scannet (scans of scannetv2_val.txt)
==========================  ==================================================
"""
import os

from detectron2.data import DatasetCatalog

from .kitti import register_kitti_instances
from .scannet import register_scannet_instances
from .wilddash import register_wilddash_instances


def register_all_nlroi_datasets(root: str):
    """Register the names above for the datasets folder ``root`` (skipping names already registered)."""
    registrations = {
        "kitti_instance_train": lambda name: register_kitti_instances(name, os.path.join(root, "kitti"), "training"),
        "wilddash_instance_val": lambda name: register_wilddash_instances(name, os.path.join(root, "wilddash", "wd_val_01")),
        "scannet_instance_train": lambda name: register_scannet_instances(name, os.path.join(root, "scannet"), "train"),
        "scannet_instance_val": lambda name: register_scannet_instances(name, os.path.join(root, "scannet"), "val"),
    }
    for name, register in registrations.items():
        if name not in DatasetCatalog.list():
            register(name)


def default_datasets_root() -> str:
    return os.path.expanduser(os.getenv("DETECTRON2_DATASETS", "datasets"))
