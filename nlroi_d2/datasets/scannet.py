"""ScanNet v2 2D instance frames (the per-scan ``*_2d-instance-filt.zip`` / ``*_2d-label-filt.zip``).

Layout (the zips unpacked in each scan folder, colour frames exported with ScanNet's SensReader)::

    <root>/scannetv2-labels.combined.tsv                ScanNet's label table (columns "id", "nyu40id")
    <root>/scannetv2_<split>.txt                        scan names of the split, one per line
    <root>/scans/<scan>/color/<frame>.jpg               colour frame
    <root>/scans/<scan>/instance-filt/<frame>.png       object number per pixel, 0 = no object
    <root>/scans/<scan>/label-filt/<frame>.png          ScanNet label id ("id" column) per pixel

Every frame with an instance PNG is a record. An object's class is the NYU40 class most of its pixels
carry; objects of the 18 classes of ScanNet's instance benchmark are kept. The label images are
smaller than the raw colour frames (640x480 vs 1296x968); they are resized to the colour frame with
nearest-neighbour sampling, i.e. assumed to cover the same field of view.
"""
import csv
import os

import cv2
import numpy as np
from detectron2.data import DatasetCatalog, MetadataCatalog

from .instance_maps import annotations_from_id_maps, image_size, read_id_map, require_path
from .labels import SCANNET_THING_LABELS, category_ids, class_names

LABEL_TABLE = "scannetv2-labels.combined.tsv"
SCANNET_LAYOUT = (f"<root>/{LABEL_TABLE}, <root>/scannetv2_<split>.txt, <root>/scans/<scan>/color/<frame>.jpg, "
                  "<root>/scans/<scan>/instance-filt/<frame>.png, <root>/scans/<scan>/label-filt/<frame>.png")


def read_nyu40_lookup(table_file: str) -> np.ndarray:
    """(max id + 1,) array mapping a ScanNet label id to its NYU40 id (0 where it has none)."""
    require_path(table_file, "ScanNet label table", SCANNET_LAYOUT)
    with open(table_file, newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    if not rows or not {"id", "nyu40id"} <= set(rows[0]):
        raise ValueError(f"{table_file}: expected a tab-separated table with columns 'id' and 'nyu40id'.")
    pairs = [(int(row["id"]), int(row["nyu40id"] or 0)) for row in rows]
    lookup = np.zeros(max(i for i, _ in pairs) + 1, dtype=np.int64)
    for scannet_id, nyu40_id in pairs:
        lookup[scannet_id] = nyu40_id
    return lookup


def object_labels(nyu40: np.ndarray, instance: np.ndarray) -> np.ndarray:
    """(H, W) label map in which every object's pixels carry the NYU40 id most of them have."""
    relabelled = nyu40.copy()
    for object_id in np.unique(instance[instance > 0]).tolist():
        mask = instance == object_id
        relabelled[mask] = np.bincount(nyu40[mask]).argmax()
    return relabelled


def _frame_record(scan_dir: str, frame: str, lookup: np.ndarray, label_to_category):
    image_file = os.path.join(scan_dir, "color", frame + ".jpg")
    require_path(image_file, "ScanNet colour frame of an instance PNG", SCANNET_LAYOUT)
    label_file = os.path.join(scan_dir, "label-filt", frame + ".png")
    require_path(label_file, "ScanNet label PNG of an instance PNG", SCANNET_LAYOUT)
    instance = read_id_map(os.path.join(scan_dir, "instance-filt", frame + ".png"))
    label = read_id_map(label_file)
    nyu40 = lookup[np.clip(label, 0, len(lookup) - 1)] * (label < len(lookup))
    height, width = image_size(image_file)
    if instance.shape != (height, width):  # nearest keeps ids intact
        instance = cv2.resize(instance.astype(np.int32), (width, height), interpolation=cv2.INTER_NEAREST)
        nyu40 = cv2.resize(nyu40.astype(np.int32), (width, height), interpolation=cv2.INTER_NEAREST)
    instance, nyu40 = instance.astype(np.int64), nyu40.astype(np.int64)
    return {
        "file_name": image_file, "image_id": f"{os.path.basename(scan_dir)}/{frame}", "height": height,
        "width": width,
        "annotations": annotations_from_id_maps(object_labels(nyu40, instance), instance, label_to_category),
    }


def load_scannet_instances(root: str, split: str):
    """Detectron2 dicts (RLE masks) of the annotated frames of the scans in ``scannetv2_<split>.txt``."""
    lookup = read_nyu40_lookup(os.path.join(root, LABEL_TABLE))
    split_file = os.path.join(root, f"scannetv2_{split}.txt")
    require_path(split_file, "ScanNet split file", SCANNET_LAYOUT)
    with open(split_file) as f:
        scans = [line.strip() for line in f if line.strip()]
    label_to_category = category_ids(SCANNET_THING_LABELS)
    records = []
    for scan in scans:
        scan_dir = os.path.join(root, "scans", scan)
        instance_dir = os.path.join(scan_dir, "instance-filt")
        require_path(instance_dir, f"ScanNet instance folder of scan {scan}", SCANNET_LAYOUT)
        frames = sorted((os.path.splitext(f)[0] for f in os.listdir(instance_dir) if f.endswith(".png")),
                        key=lambda s: (len(s), s))  # numeric order of unpadded frame numbers
        records.extend(_frame_record(scan_dir, frame, lookup, label_to_category) for frame in frames)
    return records


def register_scannet_instances(name: str, root: str, split: str):
    """Register the ScanNet frames of ``split`` under ``root`` (see the module docstring) as ``name``."""
    DatasetCatalog.register(name, lambda: load_scannet_instances(root, split))
    MetadataCatalog.get(name).set(thing_classes=class_names(SCANNET_THING_LABELS), evaluator_type="coco",
                                  dataset_root=root)
