"""SOLO's losses: Dice on the masks of positive cells, sigmoid focal loss on the category grid."""
import torch
from fvcore.nn import sigmoid_focal_loss

from d2ext.layers import dice_loss, focal_loss_targets

# The reference adds 1e-3 to each of the two sums of squares in the Dice denominator.
_DICE_EPS = 2e-3


def solo_mask_loss(mask_probs, mask_targets, num_positives, weight):
    """Dice loss summed over the positives and divided by their number (over the batch): positive cells
    (SOLO), or (instance, cell) pairs (SOLOv2, where two instances may share a cell; AdelaiDet's mean).

    Args:
        mask_probs: list of (K_i, h_i, w_i) predicted probabilities (groups of positives of one size).
        mask_targets: list of the matching (K_i, h_i, w_i) 0/1 targets.
        num_positives: total number of positives (sum of K_i).
    Returns:
        scalar; 0 (still connected to the predictions) when there is no positive.
    """
    total = sum(p.sum() for p in mask_probs) * 0.0  # keeps the graph when nothing is positive
    for probs, targets in zip(mask_probs, mask_targets):
        if probs.shape[0] > 0:
            total = total + dice_loss(probs, targets, eps=_DICE_EPS).sum()
    return weight * total / max(num_positives, 1)


def solo_category_loss(category_logits, category_labels, alpha, gamma, weight):
    """Sigmoid focal loss over every cell of every level, divided by (number of positive cells + 1): cells,
    not (instance, cell) pairs, also for SOLOv2 (AdelaiDet's ``ins_ind_labels.sum() + 1``).

    Args:
        category_logits: per level (B, C, S_l, S_l).
        category_labels: per level (B, S_l^2) int64 labels, C meaning background (row-major cells).
    """
    num_classes = category_logits[0].shape[1]
    logits = torch.cat([x.permute(0, 2, 3, 1).reshape(-1, num_classes) for x in category_logits])
    labels = torch.cat([y.reshape(-1) for y in category_labels])
    num_positive_cells = (labels != num_classes).sum()
    targets = focal_loss_targets(labels, num_classes).to(logits.dtype)
    loss = sigmoid_focal_loss(logits, targets, alpha=alpha, gamma=gamma, reduction="sum")
    return weight * loss / (num_positive_cells + 1)
