"""The MBRM training stage (the paper's; absent from the official code): the trained detector runs
frozen in inference mode on training images, each detection whose box overlaps a GT box by
``iou_threshold`` or more is paired with that box, and MBRM learns from the detections' soft masks.

Every model that refines its boxes through an ``mbrm`` attribute at inference (RDSNet, Mask R-CNN with
``GeneralizedRCNNWithMBRM``, adet_lite's CondInst / BoxInst, BlendMask, SOLO, SOLOv2) trains it with
:func:`frozen_detector_mbrm_losses`, which reads the profiles at the place where that model refines: the
stage trains MBRM on exactly what it sees at inference.
"""
from typing import Dict, List

import torch
from detectron2.structures import Boxes, pairwise_iou
from torch import nn

from .mbrm import MBRM, cat_profiles


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


def freeze_for_mbrm_stage(model: nn.Module):
    """In the MBRM training stage (``model.mbrm_train_iou`` set: ``MODEL.MBRM.TRAIN``) ``mbrm.*`` train and every
    other parameter is frozen (``requires_grad`` False, so that optimizers and DistributedDataParallel leave them
    out); outside it, nothing. Call at the end of the model's ``__init__``, when every submodule is set."""
    if model.mbrm_train_iou is None:
        return
    if model.mbrm is None:
        raise ValueError(f"{type(model).__name__}: the MBRM training stage (MODEL.MBRM.TRAIN) needs an mbrm")
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(name.startswith("mbrm."))


class _ProfileRecorder(nn.Module):
    """Stands in for a model's MBRM while :func:`frozen_detector_mbrm_losses` runs the model: keeps the
    boxes and soft-mask profiles given to either of MBRM's entry points that post-processing calls
    (``forward(masks, boxes)`` on full-image masks chunk by chunk, ``refine_detections`` on the profiles of
    pasted RoI masks) and returns the boxes unchanged."""

    def __init__(self):
        super().__init__()
        self.boxes, self.profile_chunks = [], []

    def forward(self, masks, boxes):
        return self.refine_detections(*MBRM.profiles(masks), boxes)

    def refine_detections(self, x_profiles, y_profiles, boxes):
        self.boxes.append(boxes)
        self.profile_chunks.append((x_profiles, y_profiles))
        return boxes

    def detections(self, image_size, device):
        """(boxes (N, 4), x_profiles (N, W), y_profiles (N, H)) of all recorded calls, in order."""
        boxes = torch.cat(self.boxes) if self.boxes else torch.zeros(0, 4, device=device)
        return (boxes, *cat_profiles(self.profile_chunks, image_size, device))


def frozen_detector_mbrm_losses(model: nn.Module, batched_inputs: List[Dict], iou_threshold: float):
    """``loss_mbrm`` of the MBRM stage for a model whose post-processing refines its boxes with
    ``model.mbrm``: the model runs in inference mode without gradients, one image at a time, with its
    outputs at the input size (the GT boxes' frame), and the boxes and profiles its MBRM would refine
    train that MBRM (:func:`mbrm_training_loss`).

    Args:
        model: a meta-architecture with an ``mbrm`` (:class:`MBRM`), ``inference(batched_inputs)`` and
            ``device``; its parameters but MBRM's are frozen (:func:`freeze_for_mbrm_stage`).
        batched_inputs: Detectron2's training inputs, with ``instances``.
    """
    if any("instances" not in x for x in batched_inputs):
        raise ValueError(f"{type(model).__name__}: the MBRM training stage (MODEL.MBRM.TRAIN) needs 'instances' "
                         "(annotations) in every input")
    mbrm, was_training = model.mbrm, model.training
    detections = []
    model.train(False)  # the detector as at inference (its norms' running statistics)
    try:
        with torch.no_grad():
            for x in batched_inputs:
                image_size = tuple(x["image"].shape[-2:])
                model.mbrm = recorder = _ProfileRecorder()
                model.inference([{**x, "height": image_size[0], "width": image_size[1]}])
                detections.append(recorder.detections(image_size, model.device))
    finally:
        model.mbrm = mbrm
        model.train(was_training)
    gt_instances = [x["instances"].to(model.device) for x in batched_inputs]
    return mbrm_training_loss(mbrm, detections, gt_instances, iou_threshold)
