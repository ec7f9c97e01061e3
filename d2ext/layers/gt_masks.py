import math
from typing import List

import torch
import torch.nn.functional as F
from detectron2.structures import BitMasks, Instances, PolygonMasks
from detectron2.structures.masks import polygons_to_bitmask


def ensure_gt_masks(instances: Instances, model_name):
    """One training image's ``instances``, with ``gt_masks``.

    Detectron2's ``annotations_to_instances`` adds ``gt_masks`` only to images that have annotations: an
    image without any gets an empty ``PolygonMasks`` here, so that mask targets need no special case.

    Raises:
        ValueError naming ``model_name`` if ``instances`` is not empty but has no ``gt_masks`` (data
        loaded without masks).
    """
    if not instances.has("gt_masks"):
        if len(instances):
            raise ValueError(f"{model_name} trains on instance masks but the inputs' instances have no gt_masks "
                             "(set MODEL.MASK_ON True and give the dataset 'segmentation' annotations)")
        instances.gt_masks = PolygonMasks([])
    return instances


def padded_bitmasks(gt_masks, padded_size, device=None):
    """Ground-truth instance masks as one boolean tensor on the padded batch image.

    Works for both ``INPUT.MASK_FORMAT`` values (polygon and bitmask); an instance without any polygon
    (degenerate annotation) gets an empty mask.

    Args:
        gt_masks: ``PolygonMasks``, ``BitMasks`` or an (N, h, w) tensor: one image's
            ``Instances.gt_masks`` at the image's input size (h, w).
        padded_size: (H, W) of the padded batch tensor (``ImageList.tensor``), H >= h, W >= w.
    Returns:
        (N, H, W) bool tensor on ``device``, zero in the padding.
    """
    height, width = (int(s) for s in padded_size)
    if isinstance(gt_masks, PolygonMasks):
        # Polygons are in input-image pixels: rasterising at the padded size leaves the padding empty.
        masks = torch.zeros((len(gt_masks), height, width), dtype=torch.bool)
        for i, polygons in enumerate(gt_masks.polygons):
            if len(polygons) > 0:
                masks[i] = torch.from_numpy(polygons_to_bitmask(polygons, height, width))
        return masks.to(device)
    if isinstance(gt_masks, BitMasks):
        masks = gt_masks.tensor
    elif isinstance(gt_masks, torch.Tensor) and gt_masks.dim() == 3:
        masks = gt_masks
    else:
        raise TypeError(f"padded_bitmasks: expected PolygonMasks, BitMasks or an (N, H, W) tensor, "
                        f"got {type(gt_masks).__name__}")
    mask_h, mask_w = masks.shape[-2:]
    if mask_h > height or mask_w > width:
        raise ValueError(f"padded_bitmasks: masks of size {(mask_h, mask_w)} exceed the padded size {(height, width)}")
    return F.pad(masks.bool(), (0, width - mask_w, 0, height - mask_h)).to(device)


def mask_centroids(masks):
    """(N, H, W) binary masks -> ((N, 2) float centroids (x, y) in pixel indices, (N,) float areas); the centroid
    of an empty mask is (0, 0)."""
    masks = masks.float()
    area = masks.sum(dim=(1, 2))
    xs = torch.arange(masks.shape[2], dtype=masks.dtype, device=masks.device)
    ys = torch.arange(masks.shape[1], dtype=masks.dtype, device=masks.device)
    centroids = torch.stack([(masks.sum(dim=1) * xs).sum(dim=1), (masks.sum(dim=2) * ys).sum(dim=1)], dim=1)
    return centroids / area.clamp(min=1e-6)[:, None], area


def semantic_targets(gt_instances: List[Instances], num_classes, stride, background_first=False):
    """Per-pixel class maps derived from instance masks (the targets of auxiliary semantic losses).

    Args:
        gt_instances: per image, ``gt_bitmasks_full`` (M, H, W) masks over the padded batch image and
            ``gt_classes`` (M,).
        num_classes: foreground classes.
        stride: the maps sample pixel ``stride * i + stride // 2`` of the masks.
        background_first: background is class 0 and object class c is c + 1 (AdelaiDet's BlendMask
            maps); else background is ``num_classes`` and object classes are kept (CondInst).
    Returns:
        (N, H/stride, W/stride) int64: at each pixel the class of the smallest (by mask area) instance
        covering it, background where none does.
    """
    targets = []
    for instances in gt_instances:
        masks = instances.gt_bitmasks_full
        sampled = masks[:, stride // 2::stride, stride // 2::stride]
        target = torch.full(sampled.shape[1:], num_classes, dtype=torch.int64, device=masks.device)
        if len(instances):
            areas = masks.flatten(1).sum(dim=1).float()
            covering_areas = torch.where(sampled > 0, areas[:, None, None], torch.full_like(areas[:, None, None], math.inf))
            min_area, owner = covering_areas.min(dim=0)
            target = torch.where(min_area < math.inf, instances.gt_classes[owner], target)
        targets.append(target)
    targets = torch.stack(targets)
    if background_first:
        targets = (targets + 1) % (num_classes + 1)  # background num_classes -> 0, class c -> c + 1
    return targets
