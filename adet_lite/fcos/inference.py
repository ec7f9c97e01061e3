"""FCOS inference: per-level candidates, sqrt(cls * centerness) scores, class-aware NMS, per-image cap."""
import math
from typing import List, Optional

import torch
import torch.nn.functional as F
from detectron2.layers import batched_nms
from detectron2.structures import Boxes, Instances

from d2ext.layers import capped_count


def keep_top_scores(scores, max_detections):
    """Indices of the scores >= the ``max_detections``-th largest (ties at the cut-off all kept), in order.

    No branch on the number of scores, so that it traces: the cut-off is entry ``min(N, max_detections) - 1``
    of the sorted scores followed by -inf (-inf, i.e. keep all, when there are no scores).
    """
    ranked = F.pad(scores.sort(descending=True).values, (0, 1), value=-math.inf)
    cutoff = ranked[capped_count(scores.shape[0], max_detections) - 1]
    return torch.nonzero(scores >= cutoff).squeeze(1)


# How many of the highest-scoring candidates NMS sees first (see ``nms_of_highest``): FCOS keeps up to 1000
# per level, and 1000 leave 100 detections in all but crowded, low-threshold cases.
NMS_FIRST_CANDIDATES = 1000


def nms_of_highest(boxes, scores, classes, iou_threshold, max_detections, first=NMS_FIRST_CANDIDATES):
    """``batched_nms``'s survivors as far as the ``max_detections`` highest-scoring of them go, without
    running NMS over all candidates when the ``first`` highest-scoring ones already leave that many.

    Greedy NMS decides each box from the higher-scoring boxes alone, so NMS over the ``first``
    highest-scoring candidates keeps exactly the boxes among them that NMS over all the candidates keeps;
    when that is ``max_detections`` or more, no lower-scoring survivor can enter the top
    ``max_detections`` (up to exact score ties with the ``first``-th candidate). Otherwise NMS runs over all
    of them. This matters on a GPU, where torchvision's NMS is serial over the boxes (about 3 ms for
    5000 candidates on an H100: a low score threshold leaves 1000 on each of five levels).
    Returns:
        survivor indices by decreasing score: all of ``batched_nms``'s, or at least the top
        ``max_detections`` of them.
    """
    if 0 < max_detections and first < scores.shape[0] and not torch.jit.is_tracing():  # traced: no branch on counts
        highest = scores.topk(first).indices
        keep = batched_nms(boxes[highest], scores[highest], classes[highest], iou_threshold)
        if keep.shape[0] >= max_detections:
            return highest[keep]
    return batched_nms(boxes, scores, classes, iou_threshold)


def fcos_inference_single_image(logits: List[torch.Tensor], box_reg: List[torch.Tensor],
                                quality: List[torch.Tensor], locations: List[torch.Tensor],
                                strides: List[int], image_size, top_feats: Optional[List[torch.Tensor]] = None, *,
                                score_thresh, topk_candidates, nms_thresh, max_detections, thresh_with_ctr):
    """Detections of one image.

    Args:
        logits: per level, (Rl, C) classification logits.
        box_reg: per level, (Rl, 4) (l, t, r, b) in units of the level's stride.
        quality: per level, (Rl,) centerness logits.
        locations: per level, (Rl, 2) (x, y) image coordinates.
        strides: per level, its stride.
        image_size: (h, w) of the input image (the size of the returned ``Instances``).
        top_feats: per level, (Rl, K) per-location features of a module built on FCOS (CondInst's
            dynamic-head parameters), carried to the detections as ``top_feat``.
        score_thresh: candidates need sigmoid(cls) (times sigmoid(ctr) with ``thresh_with_ctr``) above it.
        topk_candidates: at most this many candidates per level.
        max_detections: detections kept per image after NMS (<= 0: all, as AdelaiDet's ``POST_NMS_TOPK``).
    Returns:
        ``Instances`` with ``pred_boxes``, ``scores`` (sqrt(cls * ctr)), ``pred_classes``,
        ``locations``, ``fpn_levels`` (and ``top_feat``), sorted by decreasing score, at most about
        ``max_detections`` if it is > 0 (score ties at the cut-off are kept).
    """
    boxes_all, scores_all, classes_all, locations_all, levels_all, feats_all = [], [], [], [], [], []
    for level, (logits_l, reg_l, quality_l, loc_l, stride) in enumerate(
            zip(logits, box_reg, quality, locations, strides)):
        probs = logits_l.sigmoid()
        ctr = quality_l.sigmoid()[:, None]
        if thresh_with_ctr:
            probs = probs * ctr
        candidates = probs > score_thresh
        if not thresh_with_ctr:
            probs = probs * ctr
        scores = probs[candidates]
        loc_inds, class_inds = candidates.nonzero(as_tuple=True)
        scores, order = scores.topk(capped_count(scores.shape[0], topk_candidates), sorted=False)
        loc_inds, class_inds = loc_inds[order], class_inds[order]
        distances = reg_l[loc_inds] * stride
        points = loc_l[loc_inds]
        boxes_all.append(torch.cat((points - distances[:, :2], points + distances[:, 2:]), dim=1))
        scores_all.append(torch.sqrt(scores))
        classes_all.append(class_inds)
        locations_all.append(points)
        levels_all.append(torch.full_like(class_inds, level))
        if top_feats is not None:
            feats_all.append(top_feats[level][loc_inds])

    boxes, scores, classes = torch.cat(boxes_all), torch.cat(scores_all), torch.cat(classes_all)
    keep = nms_of_highest(boxes, scores, classes, nms_thresh, max_detections)
    if max_detections > 0:  # AdelaiDet: a cap <= 0 keeps every detection
        keep = keep[keep_top_scores(scores[keep], max_detections)]

    result = Instances(image_size)
    result.pred_boxes = Boxes(boxes[keep])
    result.scores = scores[keep]
    result.pred_classes = classes[keep]
    result.locations = torch.cat(locations_all)[keep]
    result.fpn_levels = torch.cat(levels_all)[keep]
    if top_feats is not None:
        result.top_feat = torch.cat(feats_all)[keep]
    return result
