#!/usr/bin/env python
"""How well can each mask representation express the ground truth of a dataset? The IoU of a perfect
prediction stored at a model's mask resolution, pasted back at the input size and thresholded at 0.5:

- ``stride s``: a full-image mask sampled at the pixels ``s * i + s // 2`` of the input (the targets of
  CondInst's dynamic head at ``MODEL.CONDINST.MASK_OUT_STRIDE`` s), upsampled with ``aligned_bilinear``;
- ``RoI R x R``: the mask rasterised in its box at R x R (Mask R-CNN's targets, R = 28) and pasted with
  Detectron2's ``paste_masks_in_image``;
- ``SOLO stride s``: SOLO / SOLOv2's mask targets at stride s (``adet_lite.solo.targets.rescale_masks``),
  binarised at >= 0.5 as the references, or the covered fractions (``LOSS.COVERAGE_MASK_TARGETS``),
  upsampled bilinearly as SOLO's inference does and thresholded strictly at 0.5.

No model is trained: this is the ceiling the representation puts on mask IoU (hence on mask AP at high
IoU thresholds). On the built-in synthetic shapes (images resized to short side 256 like the quick-start
configs) a stride-4 mask is much coarser relative to the objects than on COCO at 800 px.

    python benchmarks/mask_resolution.py                          # synthetic_shapes_val, strides 8 4 2
    python benchmarks/mask_resolution.py --strides 4 2 1 --roi-sizes 28 56 --images 100
    python benchmarks/mask_resolution.py --strides 2 --solo-strides 4 2
"""
import argparse
import os
import sys

import numpy as np
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import d2ext.data  # noqa: E402,F401  (registers the built-in datasets)
from d2ext.benchmark import command_line  # noqa: E402
from adet_lite.solo.targets import rescale_masks  # noqa: E402
from d2ext.layers import aligned_bilinear, resize_soft_masks  # noqa: E402
from detectron2.data import DatasetCatalog  # noqa: E402
from detectron2.data import transforms as T  # noqa: E402
from detectron2.layers.mask_ops import paste_masks_in_image  # noqa: E402
from detectron2.structures import Boxes, PolygonMasks, polygons_to_bitmask  # noqa: E402


def input_size_polygons(record, short_side, max_size):
    """The record's polygons and image size after Detectron2's ResizeShortestEdge to (short_side, max_size)."""
    height, width = record["height"], record["width"]
    new_height, new_width = T.ResizeShortestEdge.get_output_shape(height, width, short_side, max_size)
    resize = T.ResizeTransform(height, width, new_height, new_width)
    polygons = [[p.ravel() for p in resize.apply_polygons([np.asarray(p, dtype=np.float64).reshape(-1, 2)
                                                             for p in a["segmentation"]])]
                for a in record["annotations"]]
    return polygons, new_height, new_width


def strided_mask(mask, stride):
    """(H, W) bool -> the mask stored at ``stride`` (sampled at s * i + s // 2 of the padded image) and
    pasted back at (H, W) with aligned bilinear upsampling, thresholded at 0.5."""
    height, width = mask.shape
    padded = torch.zeros(-(-height // stride) * stride, -(-width // stride) * stride)
    padded[:height, :width] = mask.float()
    sampled = padded[stride // 2::stride, stride // 2::stride]
    return aligned_bilinear(sampled[None, None], stride)[0, 0, :height, :width] >= 0.5


def solo_target_mask(mask, stride, coverage):
    """(H, W) bool -> SOLO's mask target at ``stride`` (binarised, or the covered fractions with
    ``coverage``), upsampled bilinearly to the padded image as SOLO's inference, thresholded (> 0.5)."""
    height, width = mask.shape
    padded = torch.zeros(-(-height // stride) * stride, -(-width // stride) * stride, dtype=torch.bool)
    padded[:height, :width] = mask
    size = (padded.shape[0] // stride, padded.shape[1] // stride)
    target = rescale_masks(padded[None], stride, size, coverage=coverage)
    return resize_soft_masks(target, padded.shape)[0, :height, :width] > 0.5


def roi_mask(polygons, height, width, resolution):
    """The mask rasterised in its box at resolution x resolution and pasted at (H, W) (Mask R-CNN)."""
    masks = PolygonMasks([polygons])
    box = masks.get_bounding_boxes().tensor
    cropped = masks.crop_and_resize(box, resolution).float()
    return paste_masks_in_image(cropped, Boxes(box), (height, width), threshold=0.5)[0]


def iou(a, b):
    return (a & b).sum().item() / max((a | b).sum().item(), 1)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", default="synthetic_shapes_val")
    parser.add_argument("--images", type=int, default=0, help="first N images (0: all)")
    parser.add_argument("--short-side", type=int, default=256, help="INPUT.MIN_SIZE_TEST")
    parser.add_argument("--max-size", type=int, default=480, help="INPUT.MAX_SIZE_TEST")
    parser.add_argument("--strides", type=int, nargs="+", default=[8, 4, 2])
    parser.add_argument("--roi-sizes", type=int, nargs="+", default=[28])
    parser.add_argument("--solo-strides", type=int, nargs="*", default=[], help="SOLO's targets at these strides")
    parser.add_argument("--small-area", type=float, default=32 ** 2, help="'small' objects: area below this")
    args = parser.parse_args()

    records = DatasetCatalog.get(args.dataset)
    if args.images:
        records = records[: args.images]
    solo_names = {(stride, coverage): f"SOLO stride {stride}, {'coverage' if coverage else 'binarised'} targets"
                  for stride in args.solo_strides for coverage in (False, True)}
    names = ([f"stride {s}" for s in args.strides] + [f"RoI {r} x {r}" for r in args.roi_sizes]
             + list(solo_names.values()))
    ious = {name: [] for name in names}
    areas = []
    for record in records:
        all_polygons, height, width = input_size_polygons(record, args.short_side, args.max_size)
        for polygons in all_polygons:
            mask = torch.from_numpy(polygons_to_bitmask(polygons, height, width))
            if not mask.any():
                continue
            areas.append(mask.sum().item())
            for stride in args.strides:
                ious[f"stride {stride}"].append(iou(strided_mask(mask, stride), mask))
            for resolution in args.roi_sizes:
                ious[f"RoI {resolution} x {resolution}"].append(iou(roi_mask(polygons, height, width, resolution), mask))
            for (stride, coverage), name in solo_names.items():
                ious[name].append(iou(solo_target_mask(mask, stride, coverage), mask))
    if not areas:
        raise ValueError(f"dataset {args.dataset!r} has no instance with a non-empty mask")
    areas = np.array(areas)
    small = areas < args.small_area

    print(f"command: {command_line()}")
    print(f"{len(records)} images, {len(areas)} instances ({small.sum()} with area < {args.small_area:g} px at "
          f"the input size)")
    print("| representation | mean IoU | mean IoU, small | IoU < 0.75 | IoU < 0.85 | IoU < 0.9 |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name in names:
        values = np.array(ious[name])
        small_mean = f"{values[small].mean():.3f}" if small.any() else "-"
        print(f"| {name} | {values.mean():.3f} | {small_mean} | {(values < 0.75).mean():.1%} | "
              f"{(values < 0.85).mean():.1%} | {(values < 0.9).mean():.1%} |")


if __name__ == "__main__":
    main()
