"""WildDash (v1: ``wd_val_01``) with Cityscapes-style instance PNGs.

Layout: one folder holding, for every annotated image ``<stem>``::

    <folder>/<stem>.png (or .jpg)          RGB image
    <folder>/<stem>_instanceIds.png         Cityscapes convention: label id * 1000 + instance number,
                                            or the plain label id for pixels of no single object

Pixels with an id below 1000 that carry an instance class are a group of objects (a crowd region).
"""
import os

import numpy as np
from detectron2.data import DatasetCatalog, MetadataCatalog

from .instance_maps import annotations_from_id_maps, image_size, read_id_map, require_path
from .labels import CITYSCAPES_THING_LABELS, category_ids, class_names

INSTANCE_SUFFIX = "_instanceIds.png"
WILDDASH_LAYOUT = f"<folder>/<stem>.png or .jpg beside <folder>/<stem>{INSTANCE_SUFFIX}"


def split_cityscapes_ids(ids):
    """(H, W) Cityscapes instance ids -> (label map, instance map).

    Cityscapes numbers the objects of a class from 0 (26000 is the first car), so the instance map
    holds that number + 1 and 0 for ids below 1000 (pixels of no single object).
    """
    has_instance = ids >= 1000
    return np.where(has_instance, ids // 1000, ids), np.where(has_instance, ids % 1000 + 1, 0)


def _image_of(folder: str, stem: str) -> str:
    candidates = [os.path.join(folder, stem + ext) for ext in (".png", ".jpg")]
    for candidate in candidates:
        if os.path.exists(candidate):
            return candidate
    raise FileNotFoundError(f"No image for {stem}{INSTANCE_SUFFIX}: tried {' and '.join(candidates)}. "
                            f"Expected layout: {WILDDASH_LAYOUT}")


def load_wilddash_instances(folder: str):
    """Detectron2 dicts (RLE masks) of every ``*_instanceIds.png`` of ``folder`` and its image."""
    require_path(folder, "WildDash folder", WILDDASH_LAYOUT)
    label_to_category = category_ids(CITYSCAPES_THING_LABELS)
    files = sorted(f for f in os.listdir(folder) if f.endswith(INSTANCE_SUFFIX))
    if not files:
        raise FileNotFoundError(f"No *{INSTANCE_SUFFIX} file in {folder}. Expected layout: {WILDDASH_LAYOUT}")
    records = []
    for file in files:
        stem = file[: -len(INSTANCE_SUFFIX)]
        image_file = _image_of(folder, stem)
        ids = read_id_map(os.path.join(folder, file))
        if image_size(image_file) != ids.shape:
            raise ValueError(f"{image_file} is {image_size(image_file)} but {file} is {ids.shape}.")
        records.append({
            "file_name": image_file, "image_id": stem, "height": ids.shape[0], "width": ids.shape[1],
            "annotations": annotations_from_id_maps(*split_cityscapes_ids(ids), label_to_category),
        })
    return records


def register_wilddash_instances(name: str, folder: str):
    """Register the WildDash ``folder`` (see the module docstring) as dataset ``name``."""
    DatasetCatalog.register(name, lambda: load_wilddash_instances(folder))
    MetadataCatalog.get(name).set(thing_classes=class_names(CITYSCAPES_THING_LABELS), evaluator_type="coco",
                                  dataset_root=folder)
