"""Soft-NMS (Bodla et al. 2017) with Detectron1's semantics, batched over classes."""
import torch

SOFT_NMS_METHODS = ("linear", "gaussian", "hard")


def _iou_with_row(picked: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """IoU of picked[g] (G, 4) with every box of row g of boxes (G, M, 4) -> (G, M).

    (torchvision's box_iou would compute all G x G*M pairs.)
    """
    picked = picked[:, None, :]
    width_height = (torch.min(picked[..., 2:], boxes[..., 2:]) - torch.max(picked[..., :2], boxes[..., :2])).clamp(min=0)
    intersection = width_height[..., 0] * width_height[..., 1]
    area_picked = (picked[..., 2] - picked[..., 0]) * (picked[..., 3] - picked[..., 1])
    area_boxes = (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])
    union = area_picked + area_boxes - intersection
    return torch.where(union > 0, intersection / union.clamp(min=torch.finfo(union.dtype).tiny), torch.zeros_like(union))


def _pad_by_group(group_of_box: torch.Tensor, num_groups: int) -> torch.Tensor:
    """Scatter box indices into a padded layout with one row per group, so that groups can be
    processed side by side without a Python loop over them.

    Args:
        group_of_box: (R,) int64 group of each box, in [0, num_groups), every group non-empty.

    Returns:
        index: (G, M) int64, M = size of the largest group; row g holds the indices of the boxes of
        group g in increasing order, then -1 padding.
    """
    counts = torch.bincount(group_of_box, minlength=num_groups)
    order = torch.argsort(group_of_box, stable=True)
    first = torch.cumsum(counts, 0) - counts
    column = torch.arange(order.numel(), device=group_of_box.device) - first[group_of_box[order]]
    index = torch.full((num_groups, int(counts.max())), -1, dtype=torch.int64, device=group_of_box.device)
    index[group_of_box[order], column] = order
    return index


def _decay(iou: torch.Tensor, method: str, sigma: float, iou_threshold: float) -> torch.Tensor:
    """Score multiplier of a box that overlaps the picked box by ``iou`` (Detectron1's three rules)."""
    if method == "linear":
        return torch.where(iou > iou_threshold, 1.0 - iou, torch.ones_like(iou))
    if method == "gaussian":
        return torch.exp(-(iou * iou) / sigma)
    return (iou <= iou_threshold).to(iou.dtype)  # hard


def check_soft_nms_args(method: str, sigma: float, iou_threshold: float, score_threshold: float):
    """Raise a ValueError naming the first bad Soft-NMS setting."""
    if method not in SOFT_NMS_METHODS:
        raise ValueError(f"Soft-NMS method must be one of {SOFT_NMS_METHODS}, got {method!r}.")
    if method == "gaussian" and not sigma > 0:
        raise ValueError(f"Gaussian Soft-NMS needs sigma > 0, got {sigma}.")
    if not 0.0 <= iou_threshold <= 1.0:
        raise ValueError(f"Soft-NMS iou_threshold must lie in [0, 1], got {iou_threshold}.")
    if score_threshold < 0:
        raise ValueError(f"Soft-NMS score_threshold (the score floor) must be >= 0, got {score_threshold}.")


def batched_soft_nms(boxes: torch.Tensor, scores: torch.Tensor, idxs: torch.Tensor, method: str = "linear",
                     sigma: float = 0.5, iou_threshold: float = 0.3, score_threshold: float = 1e-4):
    """Soft-NMS run independently for every value of ``idxs`` (e.g. the class), all groups at once.

    Greedy, as in Detectron1: pick the highest current score, decay the scores of the remaining boxes
    of its group by their IoU with it, drop those that fall below ``score_threshold``, repeat.

    Args:
        boxes: (R, 4) XYXY boxes.
        scores: (R,) scores.
        idxs: (R,) int group of each box; boxes of different groups never affect each other.
        method: "linear" (w = 1 - IoU if IoU > iou_threshold), "gaussian" (w = exp(-IoU^2 / sigma)) or
            "hard" (w = 0 if IoU > iou_threshold: classic NMS).
        sigma, iou_threshold, score_threshold: see ``method``; ``score_threshold`` is the score floor.

    Returns:
        keep: (K,) int64 indices of the kept boxes, sorted by decreasing new score.
        new_scores: (K,) their decayed scores.
    """
    check_soft_nms_args(method, sigma, iou_threshold, score_threshold)
    if boxes.dim() != 2 or boxes.shape[1] != 4 or scores.shape != boxes.shape[:1] or idxs.shape != scores.shape:
        raise ValueError(
            f"batched_soft_nms expects boxes (R, 4), scores (R,), idxs (R,); got {tuple(boxes.shape)}, "
            f"{tuple(scores.shape)}, {tuple(idxs.shape)}."
        )
    if boxes.numel() == 0:
        return idxs.new_zeros(0, dtype=torch.int64), scores.new_zeros(0)

    groups, group_of_box = torch.unique(idxs, return_inverse=True)
    num_groups = groups.numel()
    index = _pad_by_group(group_of_box, num_groups)  # (G, M)
    alive = index >= 0
    safe_index = index.clamp(min=0)
    group_boxes = boxes.float()[safe_index]  # (G, M, 4)
    current = scores.float()[safe_index]  # (G, M)

    picked, picked_scores = [], []
    rows = torch.arange(num_groups, device=boxes.device)
    while True:
        best_score, best = current.masked_fill(~alive, float("-inf")).max(dim=1)  # (G,)
        has_box = alive[rows, best]
        if not bool(has_box.any()):
            break
        picked.append(index[rows[has_box], best[has_box]])
        picked_scores.append(best_score[has_box])
        alive[rows, best] = False
        iou = _iou_with_row(group_boxes[rows, best], group_boxes)  # (G, M)
        current = torch.where(alive & has_box[:, None], current * _decay(iou, method, sigma, iou_threshold), current)
        alive &= current >= score_threshold

    keep = torch.cat(picked)
    new_scores = torch.cat(picked_scores).to(scores.dtype)
    by_score = torch.argsort(new_scores, descending=True, stable=True)
    return keep[by_score], new_scores[by_score]


def soft_nms(boxes: torch.Tensor, scores: torch.Tensor, method: str = "linear", sigma: float = 0.5,
             iou_threshold: float = 0.3, score_threshold: float = 1e-4):
    """Soft-NMS over one set of boxes (Detectron1's ``soft_nms``). See :func:`batched_soft_nms`.

    Returns:
        keep: (K,) indices in the order they were picked (decreasing new score); new_scores: (K,).
    """
    return batched_soft_nms(boxes, scores, torch.zeros_like(scores, dtype=torch.int64), method, sigma,
                            iou_threshold, score_threshold)
