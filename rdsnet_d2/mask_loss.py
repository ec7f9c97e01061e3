"""Mask loss of RDSNet: pixel-wise cross-entropy with online hard example mining of background pixels
inside each instance's crop (official normalisation)."""
import torch
from torch.nn import functional as F

IGNORE = -1  # target of pixels outside the crop


def ohem_mask_loss(logits, targets, neg_pos_ratio=1.0):
    """
    Args:
        logits: (N, 2, H, W) correlation logits (channel 1 = foreground).
        targets: (N, H, W) long: 1 foreground, 0 background, -1 ignored (outside the crop).
        neg_pos_ratio: hard background pixels kept per foreground pixel of the same instance.
    Returns:
        scalar: sum_i [CE over positives and the k_i hardest negatives] / (#pos_i + #kept_i + 1),
        summed over instances and divided by (N + 1); k_i = min(ratio * #pos_i, H * W - 1).
        An instance without foreground pixels keeps no negatives and contributes 0.
    """
    if logits.shape[0] != targets.shape[0] or logits.shape[2:] != targets.shape[1:] or logits.shape[1] != 2:
        raise ValueError(f"ohem_mask_loss: logits {tuple(logits.shape)} vs targets {tuple(targets.shape)}")
    num = logits.shape[0]
    if num == 0:
        return logits.sum() * 0.0
    if bool(((targets < IGNORE) | (targets > 1)).any()):
        raise ValueError(f"ohem_mask_loss: targets must be 1 (foreground), 0 (background) or {IGNORE} (ignored)")
    pixel_loss = F.cross_entropy(logits, targets.clamp(min=0), reduction="none").flatten(1)  # (N, HW)
    targets = targets.flatten(1)
    positive = targets == 1
    negative = targets == 0
    num_pos = positive.sum(dim=1)
    budget = (num_pos.float() * neg_pos_ratio).floor().long().clamp(max=targets.shape[1] - 1)
    # Rank each instance's negatives by loss (non-negatives sorted last) and keep the first k_i.
    negative_loss = pixel_loss.detach().masked_fill(~negative, -1.0)
    order = negative_loss.argsort(dim=1, descending=True)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
    kept_negative = negative & (rank < budget[:, None])
    selected = positive | kept_negative
    per_instance = (pixel_loss * selected).sum(dim=1) / (selected.sum(dim=1) + 1)
    return per_instance.sum() / (num + 1)
