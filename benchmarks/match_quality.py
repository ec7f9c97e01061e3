#!/usr/bin/env python
"""Where does a model's mask AP go? Matches a COCO results file (``coco_instances_results.json``, written
by Detectron2's ``COCOEvaluator`` under ``OUTPUT_DIR/inference/DATASET``) against the ground truth,
ignoring scores and classes first:

- ``best IoU``: per ground-truth instance, the highest mask IoU of any detection (any class, any score):
  the masks' quality when the right detection is picked; ``recall@0.5`` / ``recall@0.75`` from it;
- ``class right``: among the detections with mask IoU >= 0.5 with an instance, whether the highest-scoring
  one has the instance's class (what class-wise AP needs); over the instances that have such a detection;
- ``outside`` / ``missed``: for the instances whose best IoU is >= 0.5, the best detection's pixels
  outside the instance, and the instance's pixels it misses, each as a fraction of the instance's area;
  ``on others``: the part of ``outside`` that lies on other instances of the image (an occluder's or a
  touching neighbour's pixels: the mask did not stop at the instance's visible boundary), whatever their class;
- detections per image, and all of it per class and for the instances whose box overlaps the box of
  another instance of their class (crowded ones, where a box crop holds a neighbour of the same class)
  vs the others.

    python benchmarks/match_quality.py output/quickstart/inference/synthetic_shapes_val/coco_instances_results.json
"""
import argparse
import json
import os
import sys
from collections import defaultdict

import numpy as np
import torch
from detectron2.structures import Boxes, BoxMode
from detectron2.structures.boxes import pairwise_intersection  # not re-exported by v0.6's detectron2.structures

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def image_match_quality(iou, gt_classes, det_classes, det_scores, class_iou=0.5):
    """
    Args:
        iou: (D, G) mask IoU of each detection with each ground-truth instance of one image.
        gt_classes (G,), det_classes (D,), det_scores (D,).
    Returns:
        best_iou (G,) (0 without detections), best_det (G,) the detection giving it (-1 without
        detections), and class_right (G,) of True / False, or None where no detection reaches ``class_iou``.
    """
    num_gt = len(gt_classes)
    if len(det_classes) == 0:
        return np.zeros(num_gt), np.full(num_gt, -1), [None] * num_gt
    iou = np.asarray(iou).reshape(len(det_classes), num_gt)
    best_det = iou.argmax(axis=0)
    best_iou = iou.max(axis=0)
    scores = np.where(iou >= class_iou, np.asarray(det_scores, dtype=np.float64)[:, None], -np.inf)
    top = scores.argmax(axis=0)
    matched = np.isfinite(scores.max(axis=0))
    class_right = [bool(det_classes[top[g]] == gt_classes[g]) if matched[g] else None for g in range(num_gt)]
    return best_iou, best_det, class_right


def has_same_class_neighbour(boxes, classes):
    """(G, 4) XYWH boxes and (G,) classes of one image -> (G,) bool: whether the instance's box overlaps
    (with a positive area) the box of another instance of its class."""
    boxes = Boxes(BoxMode.convert(torch.as_tensor(boxes, dtype=torch.float64).reshape(-1, 4),
                                  BoxMode.XYWH_ABS, BoxMode.XYXY_ABS))
    overlap = (pairwise_intersection(boxes, boxes) > 0).fill_diagonal_(False)
    classes = torch.as_tensor(classes)
    return (overlap & (classes[:, None] == classes[None])).any(dim=1).numpy()


def area_errors(pred_mask, gt_mask, other_instances):
    """(H, W) bool masks; ``other_instances``: the union of the image's other instances' masks ->
    (pixels of ``pred_mask`` outside ``gt_mask``, those of them on ``other_instances``, pixels of ``gt_mask``
    it misses), each as a fraction of ``gt_mask``'s area."""
    area = gt_mask.sum()
    outside = pred_mask & ~gt_mask
    return outside.sum() / area, (outside & other_instances).sum() / area, (gt_mask & ~pred_mask).sum() / area


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", help="coco_instances_results.json of a model's evaluation")
    parser.add_argument("--dataset", default="synthetic_shapes_val", help="the registered dataset it evaluated")
    args = parser.parse_args()

    import pycocotools.mask as mask_util
    from pycocotools.coco import COCO

    import d2ext.data  # noqa: F401  (registers the built-in datasets)
    from detectron2.data import DatasetCatalog, MetadataCatalog

    DatasetCatalog.get(args.dataset)  # generates a synthetic split's json if needed
    coco = COCO(MetadataCatalog.get(args.dataset).json_file)
    with open(args.results) as f:
        detections = json.load(f)
    by_image = defaultdict(list)
    for d in detections:
        by_image[d["image_id"]].append(d)

    best, right, classes, crowded, outside, on_others, missed = [], [], [], [], [], [], []
    for image_id in coco.getImgIds():
        annotations = coco.loadAnns(coco.getAnnIds(imgIds=image_id, iscrowd=False))
        if not annotations:
            continue
        dets = by_image.get(image_id, [])
        gt_rles = [coco.annToRLE(a) for a in annotations]
        iou = mask_util.iou([d["segmentation"] for d in dets], gt_rles, [0] * len(gt_rles)) if dets else []
        gt_classes = [a["category_id"] for a in annotations]
        image_best, image_best_det, image_right = image_match_quality(
            iou, gt_classes, [d["category_id"] for d in dets], [d["score"] for d in dets])
        best.extend(image_best)
        right.extend(image_right)
        classes.extend(gt_classes)
        crowded.extend(has_same_class_neighbour([a["bbox"] for a in annotations], gt_classes))
        gt_masks = mask_util.decode(gt_rles).astype(bool).transpose(2, 0, 1)  # (G, H, W)
        for g, (best_iou, best_det) in enumerate(zip(image_best, image_best_det)):
            errors = (np.nan, np.nan, np.nan)
            if best_iou >= 0.5:
                errors = area_errors(mask_util.decode(dets[best_det]["segmentation"]).astype(bool), gt_masks[g],
                                     np.delete(gt_masks, g, axis=0).any(axis=0))
            outside.append(errors[0])
            on_others.append(errors[1])
            missed.append(errors[2])
    best, classes, missed = np.array(best), np.array(classes), np.array(missed)
    outside, on_others = np.array(outside), np.array(on_others)
    crowded = np.array(crowded, dtype=bool)
    judged = [r for r in right if r is not None]
    print(f"{args.results}\n{len(best)} instances in {len(coco.getImgIds())} images, "
          f"{len(detections) / max(len(coco.getImgIds()), 1):.1f} detections per image")
    print(f"best IoU {best.mean():.3f}  recall@0.5 {(best >= 0.5).mean():.3f}  recall@0.75 {(best >= 0.75).mean():.3f}"
          f"  class right {np.mean(judged) if judged else float('nan'):.2f} (of {len(judged)})"
          f"  outside {np.nanmean(outside):.3f} (on others {np.nanmean(on_others):.3f})"
          f"  missed {np.nanmean(missed):.3f}")
    categories = coco.loadCats(sorted(set(classes.tolist())))
    groups = [(category["name"], classes == category["id"]) for category in categories]
    groups += [("crowded", crowded), ("not crowded", ~crowded)]
    for name, selected in groups:
        if not selected.any():
            continue
        print(f"  {name:11s} {selected.sum():4d} instances  best IoU {best[selected].mean():.3f}"
              f"  recall@0.5 {(best[selected] >= 0.5).mean():.3f}  recall@0.75 {(best[selected] >= 0.75).mean():.3f}"
              f"  outside {np.nanmean(outside[selected]):.3f}"
              f" (on others {np.nanmean(on_others[selected]):.3f})  missed {np.nanmean(missed[selected]):.3f}")


if __name__ == "__main__":
    main()
