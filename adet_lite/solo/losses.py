"""SOLO's losses: Dice on the masks of positive cells, sigmoid focal loss on the category grid, and (not the
references') binary cross-entropy on the masks around their instances."""
import torch
import torch.nn.functional as F
from fvcore.nn import sigmoid_focal_loss

from d2ext.layers import dice_loss, focal_loss_targets, mask_bounding_boxes

# The reference adds 1e-3 to each of the two sums of squares in the Dice denominator.
_DICE_EPS = 2e-3
# The region of a mask's cross-entropy: its target's box grown by this fraction of its size on each side (the
# expansion of RDSNet's training crops), so that it covers what a mask may wrongly reach next to its instance.
_BCE_REGION_EXPAND = 0.25


def _mean_over_positives(per_mask_loss, mask_probs, mask_targets, num_positives, weight):
    """``weight`` x the sum of ``per_mask_loss(probs, targets) -> (K_i,)`` over all positives / their number;
    0 (still connected to the predictions) when there is no positive."""
    total = sum(p.sum() for p in mask_probs) * 0.0  # keeps the graph when nothing is positive
    for probs, targets in zip(mask_probs, mask_targets):
        if probs.shape[0] > 0:
            total = total + per_mask_loss(probs, targets).sum()
    return weight * total / max(num_positives, 1)


def solo_mask_loss(mask_probs, mask_targets, num_positives, weight):
    """Dice loss summed over the positives and divided by their number (over the batch): positive cells
    (SOLO), or (instance, cell) pairs (SOLOv2, where two instances may share a cell; AdelaiDet's mean).

    Args:
        mask_probs: list of (K_i, h_i, w_i) predicted probabilities (groups of positives of one size).
        mask_targets: list of the matching (K_i, h_i, w_i) targets in [0, 1].
        num_positives: total number of positives (sum of K_i).
    Returns:
        scalar; 0 (still connected to the predictions) when there is no positive.
    """
    return _mean_over_positives(lambda p, t: dice_loss(p, t, eps=_DICE_EPS), mask_probs, mask_targets,
                                num_positives, weight)


def box_region_bce(probs, targets, expand=_BCE_REGION_EXPAND):
    """Binary cross-entropy of each mask averaged over the pixels of a region around its instance: the box of
    the target's nonzero pixels grown by ``expand`` times its width / height on each side (the pixels whose
    centres lie inside it). As Mask R-CNN's mask loss, every pixel near the instance counts alike, where the
    Dice loss barely penalises low probabilities outside it.

    Args:
        probs: (N, h, w) predicted probabilities.
        targets: (N, h, w) targets in [0, 1].
    Returns:
        (N,) losses; 0 for an empty target.
    """
    boxes = mask_bounding_boxes(targets > 0).tensor.to(probs.dtype)  # (N, 4) in pixels, x2 / y2 one past the last
    sizes = (boxes[:, 2:] - boxes[:, :2]).repeat(1, 2)
    region = boxes + expand * sizes * boxes.new_tensor([-1.0, -1.0, 1.0, 1.0])
    height, width = probs.shape[1:]
    centres_y = torch.arange(height, device=probs.device, dtype=probs.dtype) + 0.5
    centres_x = torch.arange(width, device=probs.device, dtype=probs.dtype) + 0.5
    inside_y = (centres_y >= region[:, 1:2]) & (centres_y < region[:, 3:4])  # (N, h)
    inside_x = (centres_x >= region[:, 0:1]) & (centres_x < region[:, 2:3])  # (N, w)
    inside = (inside_y[:, :, None] & inside_x[:, None, :]).to(probs.dtype)
    # binary_cross_entropy refuses to run under autocast (half precision would lose its log's range).
    with torch.autocast(device_type=probs.device.type, enabled=False):
        losses = F.binary_cross_entropy(probs.float(), targets.float(), reduction="none")
    return (losses * inside).sum(dim=(1, 2)) / inside.sum(dim=(1, 2)).clamp(min=1.0)


def solo_bce_loss(mask_probs, mask_targets, num_positives, weight):
    """:func:`box_region_bce` summed over the positives and divided by their number, as
    :func:`solo_mask_loss` (same arguments)."""
    return _mean_over_positives(box_region_bce, mask_probs, mask_targets, num_positives, weight)


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
