"""BlendMask's blender: crop the bases with each box, blend them with the box's attentions."""
from typing import List

import torch.nn.functional as F
from torch import nn
from detectron2.config import configurable
from detectron2.modeling.poolers import ROIPooler
from detectron2.structures import Boxes

INTERPOLATION_MODES = ("nearest", "bilinear", "bicubic", "area", "nearest-exact")


def blend(rois, attns, attn_size, mode="bilinear"):
    """Blend cropped bases with per-instance attentions.

    Args:
        rois: (N, K, R, R) the bases cropped to each instance's box.
        attns: (N, K * attn_size * attn_size) each instance's attention logits.
        mode: ``F.interpolate`` mode resizing the attentions to R x R.
    Returns:
        (N, R, R) mask logits: ``sum_k rois[:, k] * softmax_k(resize(attns))[:, k]``.
    """
    num, num_bases, height, width = rois.shape
    if attns.shape != (num, num_bases * attn_size * attn_size):
        raise ValueError(f"blend: attentions {tuple(attns.shape)} do not match {num} instances x "
                         f"{num_bases} bases x {attn_size} x {attn_size}")
    attns = attns.view(num, num_bases, attn_size, attn_size)
    align_corners = False if mode in ("bilinear", "bicubic") else None  # AdelaiDet's default (half-pixel)
    attns = F.interpolate(attns, size=(height, width), mode=mode, align_corners=align_corners)
    return (rois * attns.softmax(dim=1)).sum(dim=1)


def blender_mask_loss(mask_logits, mask_targets, weights, normalizer):
    """BlendMask's mask loss: per-pixel BCE averaged over each instance's R x R pixels, weighted
    (AdelaiDet: by the instance's FCOS centerness target), summed and divided by ``normalizer``.

    Args:
        mask_logits: (N, R, R).
        mask_targets: (N, R, R) binary.
        weights: (N,).
        normalizer: scalar (tensor or float), > 0.
    """
    losses = F.binary_cross_entropy_with_logits(mask_logits, mask_targets.to(mask_logits.dtype), reduction="none")
    return (losses.flatten(1).mean(dim=1) * weights).sum() / normalizer


class Blender(nn.Module):
    """RoIAlign of the bases to R x R per box, then :func:`blend` with the box's attentions.
    No parameters; the boxes are the ground truth's in training and the detections' at test."""

    @configurable
    def __init__(self, *, attn_size=14, resolution=56, pooler_scales=(0.25,), sampling_ratio=1,
                 pooler_type="ROIAlignV2", interpolation="bilinear"):
        super().__init__()
        if interpolation not in INTERPOLATION_MODES:
            raise ValueError(f"MODEL.BLENDMASK.TOP_INTERP must be one of {INTERPOLATION_MODES}, got {interpolation!r}")
        if len(pooler_scales) != 1:
            raise ValueError(f"MODEL.BLENDMASK.POOLER_SCALES must hold one scale (the bases' 1 / stride), "
                             f"got {tuple(pooler_scales)}")
        self.attn_size = attn_size
        self.resolution = resolution
        self.interpolation = interpolation
        self.pooler = ROIPooler(output_size=resolution, scales=tuple(pooler_scales), sampling_ratio=sampling_ratio,
                                pooler_type=pooler_type)

    @classmethod
    def from_config(cls, cfg):
        blendmask = cfg.MODEL.BLENDMASK
        return {
            "attn_size": blendmask.ATTN_SIZE,
            "resolution": blendmask.BOTTOM_RESOLUTION,
            "pooler_scales": blendmask.POOLER_SCALES,
            "sampling_ratio": blendmask.POOLER_SAMPLING_RATIO,
            "pooler_type": blendmask.POOLER_TYPE,
            "interpolation": blendmask.TOP_INTERP,
        }

    def crop(self, bases, boxes: List[Boxes]):
        """(N_img, K, H, W) bases and per image boxes (input-image coordinates) -> (sum boxes, K, R, R),
        image-major."""
        return self.pooler([bases], boxes)

    def forward(self, rois, attns):
        """(N, K, R, R) cropped bases and (N, K * M * M) attentions -> (N, R, R) mask logits."""
        return blend(rois, attns, self.attn_size, self.interpolation)
