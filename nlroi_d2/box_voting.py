"""Box voting (Gidaris & Komodakis 2015) with Detectron1's scoring methods, batched over classes."""
import torch

from .soft_nms import _iou_with_row, _pad_by_group

BOX_VOTING_SCORING_METHODS = ("ID", "TEMP_AVG", "AVG", "IOU_AVG", "GENERALIZED_AVG", "QUASI_SUM")


def check_box_voting_args(iou_threshold: float, scoring_method: str, beta: float):
    """Raise a ValueError naming the first bad box-voting setting."""
    if scoring_method not in BOX_VOTING_SCORING_METHODS:
        raise ValueError(
            f"Box voting scoring_method must be one of {BOX_VOTING_SCORING_METHODS}, got {scoring_method!r}."
        )
    if not 0.0 < iou_threshold <= 1.0:
        raise ValueError(f"Box voting iou_threshold must lie in (0, 1], got {iou_threshold}.")
    if scoring_method in ("TEMP_AVG", "GENERALIZED_AVG") and beta == 0:
        raise ValueError(f"Box voting scoring method {scoring_method} needs beta != 0.")


def box_voting(kept_boxes: torch.Tensor, kept_scores: torch.Tensor, all_boxes: torch.Tensor,
               all_scores: torch.Tensor, iou_threshold: float = 0.8, scoring_method: str = "ID",
               beta: float = 1.0, kept_classes: torch.Tensor = None, all_classes: torch.Tensor = None):
    """Refine each kept box as the score-weighted mean of the boxes that overlap it.

    A kept box k votes with every box j of ``all_boxes`` (of the same class when classes are given)
    with IoU(k, j) >= ``iou_threshold``; its new box is sum_j s_j b_j / sum_j s_j. Its new score is,
    for the voters' scores s_j (Detectron1's ``box_voting``):

    - ID: unchanged; AVG: mean(s_j); IOU_AVG: sum_j IoU_kj s_j / sum_j IoU_kj;
    - TEMP_AVG: mean_j of s_j^(1/beta) / (s_j^(1/beta) + (1 - s_j)^(1/beta));
    - GENERALIZED_AVG: mean(s_j^beta)^(1/beta); QUASI_SUM: sum(s_j) / n^beta.

    A kept box with no voter (possible only if it is absent from ``all_boxes``) keeps its box and score.
    Cost: K x M IoUs, M = the number of boxes of the largest class in ``all_boxes`` (not K x R).

    Args:
        kept_boxes: (K, 4) XYXY boxes after NMS; kept_scores: (K,) their (possibly decayed) scores.
        all_boxes: (R, 4) boxes before NMS; all_scores: (R,) their scores.
        kept_classes, all_classes: optional (K,), (R,) classes; voting only within a class.

    Returns:
        voted_boxes (K, 4), voted_scores (K,).
    """
    check_box_voting_args(iou_threshold, scoring_method, beta)
    if (kept_classes is None) != (all_classes is None):
        raise ValueError("box_voting: give both kept_classes and all_classes, or neither.")
    if kept_boxes.numel() == 0 or all_boxes.numel() == 0:
        return kept_boxes.clone(), kept_scores.clone()
    if kept_classes is None:
        kept_classes = torch.zeros(kept_boxes.shape[0], dtype=torch.int64, device=kept_boxes.device)
        all_classes = torch.zeros(all_boxes.shape[0], dtype=torch.int64, device=all_boxes.device)

    # Only boxes of the kept box's class can vote, so compare each kept box with the padded row of
    # its class (K x M pairs, M = largest class) instead of with all R boxes: with 80 classes the
    # full K x R IoU matrix is mostly cross-class pairs and dominates post-processing time.
    classes, class_row_of_all = torch.unique(all_classes, return_inverse=True)
    class_index = _pad_by_group(class_row_of_all, classes.numel())  # (C, M)
    class_row = torch.searchsorted(classes, kept_classes.to(classes.dtype)).clamp(max=classes.numel() - 1)
    voter_index = class_index[class_row]  # (K, M)
    # Padding, and the row of a kept box whose class is absent from all_boxes, are no voters.
    is_candidate = (voter_index >= 0) & (classes[class_row] == kept_classes)[:, None]
    voter_index = voter_index.clamp(min=0)
    voter_boxes = all_boxes.float()[voter_index]  # (K, M, 4)
    scores = all_scores.float()[voter_index]  # (K, M)

    iou = _iou_with_row(kept_boxes.float(), voter_boxes)  # (K, M)
    weight = ((iou >= iou_threshold) & is_candidate).float()
    num_voters = weight.sum(dim=1)  # (K,)
    has_voters = num_voters > 0
    safe_num = num_voters.clamp(min=1)

    score_weight = weight * scores  # (K, M)
    voted_boxes = torch.einsum("km,kmc->kc", score_weight, voter_boxes) / score_weight.sum(
        dim=1, keepdim=True
    ).clamp(min=torch.finfo(torch.float32).tiny)
    if scoring_method == "ID":
        voted_scores = kept_scores.float()
    elif scoring_method == "AVG":
        voted_scores = score_weight.sum(dim=1) / safe_num
    elif scoring_method == "IOU_AVG":
        iou_weight = weight * iou
        voted_scores = (iou_weight * scores).sum(dim=1) / iou_weight.sum(dim=1).clamp(min=torch.finfo(torch.float32).tiny)
    elif scoring_method == "TEMP_AVG":
        positive = scores.pow(1.0 / beta)
        negative = (1.0 - scores).clamp(min=0).pow(1.0 / beta)
        smoothed = positive / (positive + negative)
        voted_scores = (weight * smoothed).sum(dim=1) / safe_num
    elif scoring_method == "GENERALIZED_AVG":
        voted_scores = ((weight * scores.pow(beta)).sum(dim=1) / safe_num).pow(1.0 / beta)
    else:  # QUASI_SUM
        voted_scores = score_weight.sum(dim=1) / safe_num.pow(beta)

    voted_boxes = torch.where(has_voters[:, None], voted_boxes, kept_boxes.float())
    voted_scores = torch.where(has_voters, voted_scores, kept_scores.float())
    return voted_boxes.to(kept_boxes.dtype), voted_scores.to(kept_scores.dtype)
