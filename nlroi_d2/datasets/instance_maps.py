"""Detectron2 annotations from per-pixel label / instance maps (the format of KITTI, WildDash and ScanNet).

Masks are stored as COCO RLE (exact, compact), so configs that train on these datasets need
``INPUT.MASK_FORMAT: bitmask``.
"""
import os
from typing import Dict, List

import numpy as np
import pycocotools.mask as mask_util
from detectron2.structures import BoxMode
from PIL import Image


def require_path(path: str, what: str, layout: str):
    """Raise FileNotFoundError naming ``path`` (and the documented layout) when it does not exist."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{what} not found: {path}. Expected layout: {layout}")


def read_id_map(path: str) -> np.ndarray:
    """A single-channel 8- or 16-bit PNG of ids as an (H, W) int64 array."""
    with Image.open(path) as image:
        if image.mode not in ("L", "P", "I", "I;16", "I;16B", "I;16L"):
            raise ValueError(f"{path}: expected a single-channel 8- or 16-bit id PNG, got PIL mode {image.mode!r}.")
        return np.asarray(image).astype(np.int64)


def image_size(path: str):
    """(height, width) of an image file, from its header."""
    with Image.open(path) as image:
        return image.height, image.width


def mask_annotation(mask: np.ndarray, category_id: int, iscrowd: bool) -> Dict:
    """Detectron2 annotation of one (H, W) bool mask: its XYXY pixel-extent box and RLE."""
    rows, cols = np.nonzero(mask)
    rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")  # a str, as in COCO json files (pickles / serialises)
    return {
        "bbox": [int(cols.min()), int(rows.min()), int(cols.max()) + 1, int(rows.max()) + 1],
        "bbox_mode": BoxMode.XYXY_ABS,
        "category_id": category_id,
        "segmentation": rle,
        "iscrowd": int(iscrowd),
    }


def annotations_from_id_maps(label_map: np.ndarray, instance_map: np.ndarray,
                             label_to_category: Dict[int, int]) -> List[Dict]:
    """One annotation per object of the instance classes.

    Args:
        label_map: (H, W) class label id of every pixel.
        instance_map: (H, W) instance number of every pixel, 0 where the pixel belongs to no single
            object (KITTI: "no instance ground truth"; Cityscapes-style files: a group of objects).
        label_to_category: label id -> contiguous category id, for the instance classes only.

    Returns:
        Pixels of one (label, instance > 0) pair form an object (``iscrowd`` 0); the instance-0 pixels
        of an instance class form one ``iscrowd`` 1 region per class, which Detectron2 leaves out of
        training and COCO evaluation ignores.
    """
    if label_map.shape != instance_map.shape:
        raise ValueError(f"label map {label_map.shape} and instance map {instance_map.shape} differ in size.")
    annotations = []
    is_thing = np.isin(label_map, list(label_to_category))
    segments = np.unique(np.stack([label_map[is_thing], instance_map[is_thing]], axis=1), axis=0)
    for label, instance in segments.tolist():
        mask = (label_map == label) & (instance_map == instance)
        annotations.append(mask_annotation(mask, label_to_category[label], iscrowd=instance == 0))
    return annotations
