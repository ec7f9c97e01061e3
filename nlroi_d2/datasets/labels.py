"""Instance classes of the datasets of the NL-RoI paper, as (label id in the annotation files, name)."""

# Cityscapes label ids of the classes with instances that Cityscapes evaluates (cityscapesScripts'
# labels.py: hasInstances and not ignoreInEval). KITTI's instance benchmark and WildDash use these ids.
CITYSCAPES_THING_LABELS = (
    (24, "person"), (25, "rider"), (26, "car"), (27, "truck"), (28, "bus"), (31, "train"),
    (32, "motorcycle"), (33, "bicycle"),
)

# NYU40 ids of the 18 classes of ScanNet's instance benchmark (its 20 classes without wall and floor).
SCANNET_THING_LABELS = (
    (3, "cabinet"), (4, "bed"), (5, "chair"), (6, "sofa"), (7, "table"), (8, "door"), (9, "window"),
    (10, "bookshelf"), (11, "picture"), (12, "counter"), (14, "desk"), (16, "curtain"),
    (24, "refrigerator"), (28, "shower curtain"), (33, "toilet"), (34, "sink"), (36, "bathtub"),
    (39, "otherfurniture"),
)


def category_ids(labels):
    """{label id: contiguous category id} for a table of (label id, name)."""
    return {label: index for index, (label, _) in enumerate(labels)}


def class_names(labels):
    return [name for _, name in labels]
