"""The MBRM training stage (the paper's; absent from the official code): the trained detector runs
frozen in inference mode on training images, each detection whose box overlaps a GT box by
``iou_threshold`` or more is paired with that box, and MBRM learns from the detections' soft masks."""
from detectron2.structures import Boxes, pairwise_iou


def mbrm_training_loss(mbrm, detections, gt_instances, iou_threshold=0.5):
    """
    Args:
        mbrm: an :class:`MBRM`.
        detections: per image a tuple (boxes (N, 4), x_profiles (N, W), y_profiles (N, H)) of the frozen
            detector, in the same image frame as the GT boxes.
        gt_instances: per image ``Instances`` with ``gt_boxes``.
    Returns:
        {"loss_mbrm": the posterior cross-entropy averaged over all matched detections}.
    """
    total, count = None, 0
    for (boxes, x_profiles, y_profiles), gt in zip(detections, gt_instances):
        if len(gt) == 0 or boxes.shape[0] == 0:
            continue
        iou = pairwise_iou(Boxes(boxes), gt.gt_boxes)  # (N, G)
        best_iou, best_gt = iou.max(dim=1)
        matched = best_iou >= iou_threshold
        if not matched.any():
            continue
        num = int(matched.sum())
        loss = mbrm.loss(x_profiles[matched], y_profiles[matched], boxes[matched],
                         gt.gt_boxes.tensor[best_gt[matched]])
        total = loss * num if total is None else total + loss * num
        count += num
    if total is None:  # nothing matched: zero, still connected to MBRM's parameters
        total, count = sum(p.sum() for p in mbrm.parameters()) * 0.0, 1
    return {"loss_mbrm": total / count}
