"""Checks of the ground truth a model trains on, shared by every method."""
from typing import List

import torch
from detectron2.structures import Instances


def check_gt_classes(gt_instances: List[Instances], num_classes: int, config_key: str):
    """Raise a ValueError naming the image and ``config_key`` if a ``gt_classes`` value is outside
    [0, ``num_classes``): a class equal to ``num_classes`` would train as background, a larger or negative one
    would fail inside ``one_hot`` or index another class. One device-to-host read for the whole batch."""
    classes = [instances.gt_classes for instances in gt_instances]
    if not any(len(c) for c in classes):
        return
    outside = [(c < 0) | (c >= num_classes) for c in classes]
    if not bool(torch.cat(outside).any()):
        return
    image = next(i for i, o in enumerate(outside) if o.any())
    raise ValueError(f"image {image} has class {int(classes[image][outside[image]][0])}, but classes must lie in "
                     f"[0, {config_key}) = [0, {num_classes})")
