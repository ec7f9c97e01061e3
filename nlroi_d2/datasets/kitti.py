"""KITTI semantic / instance segmentation 2015 (the "data_semantics" download; 200 training images).

Layout (as unpacked; the test split has no ground truth)::

    <root>/training/image_2/<name>.png     RGB image
    <root>/training/instance/<name>.png    uint16: semantic label id * 256 + instance id

Per the benchmark's devkit README: the high byte is the Cityscapes label id, the low byte the instance
id counted from 1 per class, and instance id 0 means "no instance ground truth" (kept as a crowd region).
"""
import os

from detectron2.data import DatasetCatalog, MetadataCatalog

from .instance_maps import annotations_from_id_maps, image_size, read_id_map, require_path
from .labels import CITYSCAPES_THING_LABELS, category_ids, class_names

KITTI_LAYOUT = "<root>/<split>/image_2/<name>.png and <root>/<split>/instance/<name>.png (uint16 label*256+instance)"


def load_kitti_instances(root: str, split: str = "training"):
    """Detectron2 dicts (RLE masks) of the images of ``<root>/<split>`` that have an instance PNG."""
    image_dir = os.path.join(root, split, "image_2")
    instance_dir = os.path.join(root, split, "instance")
    require_path(image_dir, "KITTI image folder", KITTI_LAYOUT)
    require_path(instance_dir, "KITTI instance ground-truth folder", KITTI_LAYOUT)
    label_to_category = category_ids(CITYSCAPES_THING_LABELS)
    records = []
    for file in sorted(f for f in os.listdir(instance_dir) if f.endswith(".png")):
        image_file = os.path.join(image_dir, file)
        require_path(image_file, "KITTI image of an instance PNG", KITTI_LAYOUT)
        ids = read_id_map(os.path.join(instance_dir, file))
        if image_size(image_file) != ids.shape:
            raise ValueError(f"{image_file} is {image_size(image_file)} but its instance PNG is {ids.shape}.")
        records.append({
            "file_name": image_file, "image_id": os.path.splitext(file)[0],
            "height": ids.shape[0], "width": ids.shape[1],
            "annotations": annotations_from_id_maps(ids // 256, ids % 256, label_to_category),
        })
    return records


def register_kitti_instances(name: str, root: str, split: str = "training"):
    """Register ``<root>/<split>`` (see the module docstring) as dataset ``name`` (COCO-style evaluation)."""
    DatasetCatalog.register(name, lambda: load_kitti_instances(root, split))
    MetadataCatalog.get(name).set(thing_classes=class_names(CITYSCAPES_THING_LABELS), evaluator_type="coco",
                                  dataset_root=root)
