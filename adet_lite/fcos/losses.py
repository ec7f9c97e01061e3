"""FCOS losses: sigmoid focal classification, IoU-family box regression, centerness / IoU quality."""
import torch
import torch.nn.functional as F
from fvcore.nn import giou_loss, sigmoid_focal_loss
from detectron2.utils import comm

from d2ext.layers import focal_loss_targets

from .targets import centerness_targets

LOC_LOSS_TYPES = ("giou", "iou", "linear_iou")
BOX_QUALITIES = ("ctrness", "iou")


def sum_over_workers(value: torch.Tensor) -> torch.Tensor:
    """Sum of a tensor over all distributed workers (the tensor itself in one process)."""
    if comm.get_world_size() > 1:
        value = value.clone()
        torch.distributed.all_reduce(value)
    return value


def centerness_normalizer(ctr_targets):
    """Divisor of centerness-weighted losses: the sum of the centerness targets averaged over the
    distributed workers (FCOS's box loss, BlendMask's mask loss), at least 1e-6."""
    ctr_sum = sum_over_workers(ctr_targets.sum().detach()) / comm.get_world_size()
    return ctr_sum.clamp(min=1e-6)


def distances_to_relative_boxes(distances):
    """(P, 4) (l, t, r, b) distances from a location -> (P, 4) XYXY boxes relative to that location."""
    return torch.cat((-distances[:, :2], distances[:, 2:]), dim=1)


def aligned_iou_from_distances(pred, target):
    """IoU of the boxes given by (l, t, r, b) distances from the same location; (P, 4) each -> (P,)."""
    pred_area = (pred[:, 0] + pred[:, 2]) * (pred[:, 1] + pred[:, 3])
    target_area = (target[:, 0] + target[:, 2]) * (target[:, 1] + target[:, 3])
    inter_w = torch.minimum(pred[:, 0], target[:, 0]) + torch.minimum(pred[:, 2], target[:, 2])
    inter_h = torch.minimum(pred[:, 1], target[:, 1]) + torch.minimum(pred[:, 3], target[:, 3])
    intersection = inter_w.clamp(min=0) * inter_h.clamp(min=0)
    return intersection / (pred_area + target_area - intersection).clamp(min=1e-7)


def box_regression_loss(pred, target, loss_type):
    """Per-location loss (P,) between (l, t, r, b) predictions and targets of the same locations."""
    if loss_type == "giou":
        return giou_loss(distances_to_relative_boxes(pred), distances_to_relative_boxes(target), reduction="none")
    iou = aligned_iou_from_distances(pred, target)
    if loss_type == "iou":
        return -torch.log(iou.clamp(min=1e-7))
    if loss_type == "linear_iou":
        return 1.0 - iou
    raise ValueError(f"MODEL.FCOS.LOC_LOSS_TYPE must be one of {LOC_LOSS_TYPES}, got {loss_type!r}")


def fcos_losses(logits, box_reg, quality, labels, reg_targets, *, cls_normalizer, num_pos_avg,
                focal_alpha=0.25, focal_gamma=2.0, cls_weight=1.0, loc_loss_type="giou", box_quality="ctrness"):
    """FCOS losses over the locations of a batch (all images and levels flattened).

    Args:
        logits: (R, C) classification logits.
        box_reg: (R, 4) predicted (l, t, r, b) distances in units of each location's stride.
        quality: (R,) centerness (or IoU-quality) logits.
        labels: (R,) int64, ``C`` for background.
        reg_targets: (R, 4) target distances in units of each location's stride.
        cls_normalizer: divisor of the summed focal loss (positives, their moving average, or all).
        num_pos_avg: positives per worker (>= 1), divisor of the IoU-quality losses.
    Returns:
        dict with ``loss_fcos_cls``, ``loss_fcos_loc`` and ``loss_fcos_ctr``.
    """
    num_classes = logits.shape[1]
    pos_inds = torch.nonzero(labels != num_classes).squeeze(1)
    class_targets = focal_loss_targets(labels, num_classes).to(logits.dtype)
    loss_cls = cls_weight * sigmoid_focal_loss(
        logits, class_targets, alpha=focal_alpha, gamma=focal_gamma, reduction="sum") / cls_normalizer

    box_reg, reg_targets, quality = box_reg[pos_inds], reg_targets[pos_inds], quality[pos_inds]
    ctr_targets = centerness_targets(reg_targets)
    # A collective: every worker must reach it, also one without positives (else the others hang).
    ctr_normalizer = centerness_normalizer(ctr_targets)
    if pos_inds.numel() == 0:
        # Keep every prediction in the graph (distributed training needs all parameters used).
        zero = box_reg.sum() * 0.0 + quality.sum() * 0.0
        return {"loss_fcos_cls": loss_cls, "loss_fcos_loc": zero, "loss_fcos_ctr": zero}

    if not torch.isfinite(box_reg).all():
        # fvcore's GIoU would fail on an assertion about the box corners: name the loss instead.
        raise FloatingPointError("loss_fcos_loc: the predicted box distances contain Inf/NaN. "
                                 "Training has diverged.")
    loc_losses = box_regression_loss(box_reg, reg_targets, loc_loss_type)
    if box_quality == "ctrness":
        # Weighted by the centerness targets, normalised by their sum over all workers.
        loss_loc = (loc_losses * ctr_targets).sum() / ctr_normalizer
        quality_targets = ctr_targets
    elif box_quality == "iou":
        loss_loc = loc_losses.sum() / num_pos_avg
        quality_targets = aligned_iou_from_distances(box_reg, reg_targets).detach()
    else:
        raise ValueError(f"MODEL.FCOS.BOX_QUALITY must be one of {BOX_QUALITIES}, got {box_quality!r}")
    loss_ctr = F.binary_cross_entropy_with_logits(quality, quality_targets, reduction="sum") / num_pos_avg
    return {"loss_fcos_cls": loss_cls, "loss_fcos_loc": loss_loc, "loss_fcos_ctr": loss_ctr}
