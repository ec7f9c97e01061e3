import math
import re
from typing import Dict, List

import torch
from fvcore.nn import sigmoid_focal_loss
from torch import nn
from detectron2.config import configurable
from detectron2.layers import ShapeSpec

from d2ext.config_checks import check_in_features, check_norm
from d2ext.layers import (ReferenceCheckpointMixin, aligned_bilinear, conv_norm_relu, conv_norm_relu_reference_key,
                          focal_loss_targets, semantic_targets)


class MaskBranch(ReferenceCheckpointMixin, nn.Module):
    """CondInst's mask branch: P3-P5 refined to ``channels`` and summed at P3's resolution (aligned
    bilinear upsampling), a conv tower, and a 1x1 projection to the ``out_channels`` mask features
    that every instance's dynamic head reads. Optionally an auxiliary semantic-segmentation loss.
    """

    # Unversioned checkpoints use AdelaiDet's names.
    _reference_source = "AdelaiDet"

    @configurable
    def __init__(self, *, input_shape: Dict[str, ShapeSpec], in_features: List[str], channels=128,
                 out_channels=8, norm="BN", num_convs=4, semantic_loss_on=False, num_classes=80,
                 prior_prob=0.01, focal_alpha=0.25, focal_gamma=2.0):
        super().__init__()
        self.in_features = list(in_features)
        self.out_stride = input_shape[self.in_features[0]].stride
        self.refine = nn.ModuleList([conv_norm_relu(input_shape[f].channels, channels, norm) for f in in_features])
        self.tower = nn.Sequential(*[conv_norm_relu(channels, channels, norm) for _ in range(num_convs)])
        self.predictor = nn.Conv2d(channels, out_channels, kernel_size=1)
        nn.init.kaiming_uniform_(self.predictor.weight, a=1)
        nn.init.constant_(self.predictor.bias, 0.0)
        self.num_convs = num_convs
        self.semantic_loss_on = semantic_loss_on
        if semantic_loss_on:
            in_channels = input_shape[self.in_features[0]].channels
            self.num_classes = num_classes
            self.focal_alpha = focal_alpha
            self.focal_gamma = focal_gamma
            self.seg_head = nn.Sequential(conv_norm_relu(in_channels, channels, norm),
                                          conv_norm_relu(channels, channels, norm))
            self.seg_logits = nn.Conv2d(channels, num_classes, kernel_size=1)
            nn.init.normal_(self.seg_logits.weight, std=0.01)
            nn.init.constant_(self.seg_logits.bias, -math.log((1 - prior_prob) / prior_prob))

    @classmethod
    def from_config(cls, cfg, input_shape: Dict[str, ShapeSpec]):
        branch = cfg.MODEL.CONDINST.MASK_BRANCH
        check_in_features("MODEL.CONDINST.MASK_BRANCH.IN_FEATURES", branch.IN_FEATURES, input_shape)
        check_norm("MODEL.CONDINST.MASK_BRANCH.NORM", branch.NORM,
                   {"MODEL.CONDINST.MASK_BRANCH.CHANNELS": branch.CHANNELS})
        return {
            "input_shape": input_shape,
            "in_features": branch.IN_FEATURES,
            "channels": branch.CHANNELS,
            "out_channels": branch.OUT_CHANNELS,
            "norm": branch.NORM,
            "num_convs": branch.NUM_CONVS,
            "semantic_loss_on": branch.SEMANTIC_LOSS_ON,
            "num_classes": cfg.MODEL.FCOS.NUM_CLASSES,
            "prior_prob": cfg.MODEL.FCOS.PRIOR_PROB,
            "focal_alpha": cfg.MODEL.FCOS.LOSS_ALPHA,
            "focal_gamma": cfg.MODEL.FCOS.LOSS_GAMMA,
        }

    def forward(self, features: Dict[str, torch.Tensor], gt_instances=None):
        """
        Args:
            features: backbone features; those of ``in_features`` have strides s, 2s, 4s, ... and sizes
                that divide exactly (true for inputs padded to the backbone's size divisibility).
            gt_instances: training only, with ``gt_bitmasks_full`` (for the semantic loss).
        Returns:
            mask_feats: (N, out_channels, H, W) at the stride of ``in_features[0]``.
            losses: {"loss_sem": ...} in training with the semantic loss, else {}.
        """
        x = self.refine[0](features[self.in_features[0]])
        for refine, name in zip(self.refine[1:], self.in_features[1:]):
            refined = refine(features[name])
            factor = x.shape[-2] // refined.shape[-2]
            if refined.shape[-2] * factor != x.shape[-2] or refined.shape[-1] * factor != x.shape[-1]:
                raise ValueError(f"mask branch: feature {name} of size {tuple(refined.shape[-2:])} does not "
                                 f"divide {self.in_features[0]}'s {tuple(x.shape[-2:])}")
            x = x + aligned_bilinear(refined, factor)
        mask_feats = self.predictor(self.tower(x))

        losses = {}
        if self.training and self.semantic_loss_on:
            logits = self.seg_logits(self.seg_head(features[self.in_features[0]]))
            targets = semantic_targets(gt_instances, self.num_classes, self.out_stride)  # (N, H, W)
            one_hot = focal_loss_targets(targets, self.num_classes).permute(0, 3, 1, 2).to(logits.dtype)
            num_pos = one_hot.sum().clamp(min=1.0)
            losses["loss_sem"] = sigmoid_focal_loss(
                logits, one_hot, alpha=self.focal_alpha, gamma=self.focal_gamma, reduction="sum") / num_pos
        return mask_feats, losses

    def _rename_reference_key(self, name):
        renamed = conv_norm_relu_reference_key(name, ("refine", "tower", "seg_head"))
        if renamed is not None:
            return renamed
        match = re.fullmatch(r"tower\.(\d+)\.(weight|bias)", name)
        if match and int(match.group(1)) == self.num_convs:
            return f"predictor.{match.group(2)}"
        match = re.fullmatch(r"logits\.(weight|bias)", name)
        if match:
            return f"seg_logits.{match.group(1)}"
        return None
