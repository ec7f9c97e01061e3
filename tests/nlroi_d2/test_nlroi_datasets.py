"""KITTI / WildDash / ScanNet loaders on tiny fixtures written here: every object's class, box and exact
mask against the objects painted into the fixture, crowd regions, Detectron2's mapper, and errors that
name the missing path."""
import os

import numpy as np
import pycocotools.mask as mask_util
import pytest
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, DatasetMapper, MetadataCatalog
from PIL import Image

from nlroi_d2.datasets import (default_datasets_root, load_kitti_instances, load_scannet_instances,
                               load_wilddash_instances, register_kitti_instances)

H, W = 12, 16


def box_mask(y0, y1, x0, x1, shape=(H, W)):
    mask = np.zeros(shape, bool)
    mask[y0:y1, x0:x1] = True
    return mask


def write_png(path, array, dtype):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(np.asarray(array, dtype=dtype)).save(path)


def write_rgb(path, shape=(H, W)):
    write_png(path, np.full((*shape, 3), 90), np.uint8)


def objects_of(record):
    """{(category, iscrowd, box): decoded mask} of a record, for order-free comparison."""
    out = {}
    for a in record["annotations"]:
        key = (a["category_id"], a["iscrowd"], tuple(a["bbox"]))
        assert key not in out
        out[key] = mask_util.decode(a["segmentation"]).astype(bool)
    return out


def expected_objects(painted):
    """The same mapping for a list of (category, iscrowd, mask) painted into a fixture."""
    out = {}
    for category, iscrowd, mask in painted:
        rows, cols = np.nonzero(mask)
        out[(category, iscrowd, (cols.min(), rows.min(), cols.max() + 1, rows.max() + 1))] = mask
    return out


def assert_same_objects(record, painted):
    actual, expected = objects_of(record), expected_objects(painted)
    assert set(actual) == set(expected)
    for key, mask in expected.items():
        assert np.array_equal(actual[key], mask), key


# KITTI: uint16 label * 256 + instance. Cityscapes ids: car 26 (category 2), person 24 (category 0), road 7.
def kitti_fixture(root):
    ids = np.full((H, W), 7 * 256)  # road, no instance
    car1, car2, person = box_mask(1, 5, 1, 6), box_mask(6, 11, 2, 9), box_mask(0, 4, 10, 12)
    unsure_car = box_mask(8, 12, 12, 16)
    ids[car1], ids[car2], ids[person] = 26 * 256 + 1, 26 * 256 + 2, 24 * 256 + 1
    ids[unsure_car] = 26 * 256  # instance id 0: no instance ground truth
    write_png(os.path.join(root, "training", "instance", "000000_10.png"), ids, np.uint16)
    write_rgb(os.path.join(root, "training", "image_2", "000000_10.png"))
    return [(2, 0, car1), (2, 0, car2), (0, 0, person), (2, 1, unsure_car)]


def test_kitti_loader(tmp_path):
    painted = kitti_fixture(str(tmp_path))
    (record,) = load_kitti_instances(str(tmp_path))
    assert record["file_name"] == os.path.join(str(tmp_path), "training", "image_2", "000000_10.png")
    assert (record["height"], record["width"]) == (H, W)
    assert_same_objects(record, painted)


def test_kitti_records_go_through_detectron2s_mapper(tmp_path):
    painted = kitti_fixture(str(tmp_path))
    cfg = get_cfg()
    cfg.MODEL.MASK_ON, cfg.INPUT.MASK_FORMAT = True, "bitmask"
    cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST = H, 1000  # no resize
    mapper = DatasetMapper(cfg, is_train=False)
    mapper.is_train = True  # keep the annotations; the test-time resize keeps the fixture's size
    instances = mapper(load_kitti_instances(str(tmp_path))[0])["instances"]
    objects = [(c, m) for c, crowd, m in painted if not crowd]  # the mapper drops crowd regions
    assert sorted(instances.gt_classes.tolist()) == sorted(c for c, _ in objects)
    masks = instances.gt_masks.tensor.numpy()
    assert all(any(np.array_equal(m, mask) for m in masks) for _, mask in objects)


# WildDash / Cityscapes style: label * 1000 + k with k counted from 0, or the plain label id.
def test_wilddash_loader(tmp_path):
    folder = str(tmp_path / "wd_val_01")
    ids = np.full((H, W), 7)  # road
    car0, car1, bicycle0, people = box_mask(1, 5, 1, 6), box_mask(6, 11, 2, 9), box_mask(0, 3, 8, 16), box_mask(9, 12, 11, 15)
    ids[car0], ids[car1], ids[bicycle0], ids[people] = 26000, 26001, 33000, 24  # 24: a group of persons
    write_png(os.path.join(folder, "cn0000_100000_instanceIds.png"), ids, np.uint16)
    write_rgb(os.path.join(folder, "cn0000_100000.png"))
    (record,) = load_wilddash_instances(folder)
    assert record["file_name"].endswith("cn0000_100000.png")
    assert_same_objects(record, [(2, 0, car0), (2, 0, car1), (7, 0, bicycle0), (0, 1, people)])


# ScanNet: instance-filt = object number, label-filt = ScanNet id, mapped to NYU40 by the label table.
SCANNET_TABLE = "id\traw_category\tcategory\tcount\tnyu40id\tnyu40class\n" \
                "1\twall\twall\t1\t1\twall\n2\tchair\tchair\t1\t5\tchair\n5\ttable\ttable\t1\t7\ttable\n" \
                "40\tkitchen cabinet\tcabinet\t1\t3\tcabinet\n"


def scannet_fixture(root, label_shape):
    """Two frames of one scan; label images of ``label_shape`` and colour frames of (H, W)."""
    with open(os.path.join(root, "scannetv2-labels.combined.tsv"), "w") as f:
        f.write(SCANNET_TABLE)
    with open(os.path.join(root, "scannetv2_train.txt"), "w") as f:
        f.write("scene0000_00\n")
    scan = os.path.join(root, "scans", "scene0000_00")
    h, w = label_shape
    labels, instances = np.ones(label_shape), np.zeros(label_shape)  # wall everywhere, no object
    chair, table, cabinet = box_mask(0, h // 2, 0, w // 2, label_shape), box_mask(h // 2, h, 0, w // 2, label_shape), \
        box_mask(0, h // 2, w // 2, w, label_shape)
    labels[chair], labels[table], labels[cabinet] = 2, 5, 40
    labels[0, 0] = 5  # one table pixel inside the chair: the object's majority class wins
    instances[chair], instances[table], instances[cabinet] = 1, 2, 3
    for frame in ("0", "100"):
        write_png(os.path.join(scan, "instance-filt", frame + ".png"), instances, np.uint8)
        write_png(os.path.join(scan, "label-filt", frame + ".png"), labels, np.uint16)
        write_rgb(os.path.join(scan, "color", frame + ".jpg"))
    scale = (H // h, W // w)
    grow = (lambda m: np.kron(m, np.ones(scale, bool))) if scale != (1, 1) else (lambda m: m)
    return [(2, 0, grow(chair)), (4, 0, grow(table)), (0, 0, grow(cabinet))]  # chair, table, cabinet categories


@pytest.mark.parametrize("label_shape", [(H, W), (H // 2, W // 2)])
def test_scannet_loader(tmp_path, label_shape):
    painted = scannet_fixture(str(tmp_path), label_shape)
    records = load_scannet_instances(str(tmp_path), "train")
    assert [r["image_id"] for r in records] == ["scene0000_00/0", "scene0000_00/100"]
    for record in records:
        assert (record["height"], record["width"]) == (H, W)
        assert_same_objects(record, painted)


def test_missing_files_are_named(tmp_path):
    root = str(tmp_path)
    with pytest.raises(FileNotFoundError, match=os.path.join(root, "training", "image_2")):
        load_kitti_instances(root)
    kitti_fixture(root)
    os.remove(os.path.join(root, "training", "image_2", "000000_10.png"))
    with pytest.raises(FileNotFoundError, match="000000_10.png"):
        load_kitti_instances(root)
    os.makedirs(os.path.join(root, "wd"))
    with pytest.raises(FileNotFoundError, match="_instanceIds.png"):
        load_wilddash_instances(os.path.join(root, "wd"))
    with pytest.raises(FileNotFoundError, match="scannetv2-labels.combined.tsv"):
        load_scannet_instances(root, "train")


def test_non_id_png_is_an_error(tmp_path):
    root = str(tmp_path)
    kitti_fixture(root)
    write_rgb(os.path.join(root, "training", "instance", "000000_10.png"))  # an RGB image instead of ids
    with pytest.raises(ValueError, match="single-channel"):
        load_kitti_instances(root)


def test_registration(tmp_path):
    painted = kitti_fixture(str(tmp_path))
    register_kitti_instances("nlroi_test_kitti", str(tmp_path))
    assert_same_objects(DatasetCatalog.get("nlroi_test_kitti")[0], painted)
    assert MetadataCatalog.get("nlroi_test_kitti").thing_classes[2] == "car"
    builtin = os.path.join(default_datasets_root(), "kitti")
    assert MetadataCatalog.get("kitti_instance_train").dataset_root == builtin
    for name in ("wilddash_instance_val", "scannet_instance_train", "scannet_instance_val"):
        assert name in DatasetCatalog.list()
