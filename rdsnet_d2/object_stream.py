"""Object stream head: RetinaNet's classification and box towers plus a separate representation tower
predicting, per anchor, a background and a foreground d-dimensional kernel for the correlation."""
import math
from typing import List

import torch
from detectron2.config import configurable
from detectron2.layers import Conv2d, ShapeSpec, get_norm
from detectron2.modeling.anchor_generator import build_anchor_generator
from torch import nn
from torch.nn import functional as F

from d2ext.config_checks import check_norm


def _tower(in_channels, num_convs, norm):
    """``num_convs`` x (3x3 conv, norm, ReLU); biases only without norm."""
    layers = [
        Conv2d(in_channels, in_channels, kernel_size=3, padding=1, bias=not norm,
               norm=get_norm(norm, in_channels), activation=F.relu)
        for _ in range(num_convs)
    ]
    return nn.Sequential(*layers)


class RDSNetHead(nn.Module):
    """Per level: class logits (N, A*K, H, W), box deltas (N, A*4, H, W) and object representations
    (N, A*2*d, H, W) whose channel a*2d + s*d + k holds slot s (0 = background, 1 = foreground)."""

    @configurable
    def __init__(self, *, in_channels, num_anchors, num_classes, rep_dim, num_convs=4, norm="GN",
                 prior_prob=0.01):
        super().__init__()
        if rep_dim <= 0:
            raise ValueError(f"MODEL.RDSNET.REP_DIM must be positive, got {rep_dim}")
        self.num_classes = num_classes
        self.rep_dim = rep_dim
        self.cls_tower = _tower(in_channels, num_convs, norm)
        self.bbox_tower = _tower(in_channels, num_convs, norm)
        self.rep_tower = _tower(in_channels, num_convs, norm)
        self.cls_score = nn.Conv2d(in_channels, num_anchors * num_classes, 3, padding=1)
        self.bbox_pred = nn.Conv2d(in_channels, num_anchors * 4, 3, padding=1)
        self.rep_pred = nn.Conv2d(in_channels, num_anchors * 2 * rep_dim, 3, padding=1)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):  # the official init: N(0, 0.01), zero bias
                nn.init.normal_(module.weight, std=0.01)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        nn.init.constant_(self.cls_score.bias, -math.log((1 - prior_prob) / prior_prob))

    @classmethod
    def from_config(cls, cfg, input_shape: List[ShapeSpec]):
        channels = {s.channels for s in input_shape}
        if len(channels) != 1:
            raise ValueError(f"RDSNetHead: all input levels need the same channels, got {sorted(channels)}")
        anchors_per_cell = build_anchor_generator(cfg, input_shape).num_cell_anchors
        if len(set(anchors_per_cell)) != 1:
            raise ValueError("RDSNetHead: every level needs the same number of anchors per cell")
        in_channels = channels.pop()
        check_norm("MODEL.RDSNET.HEAD_NORM", cfg.MODEL.RDSNET.HEAD_NORM, {"the towers' input features": in_channels})
        return {
            "in_channels": in_channels,
            "num_anchors": anchors_per_cell[0],
            "num_classes": cfg.MODEL.RETINANET.NUM_CLASSES,
            "rep_dim": cfg.MODEL.RDSNET.REP_DIM,
            "num_convs": cfg.MODEL.RETINANET.NUM_CONVS,
            "norm": cfg.MODEL.RDSNET.HEAD_NORM,
            "prior_prob": cfg.MODEL.RETINANET.PRIOR_PROB,
        }

    def forward(self, features: List[torch.Tensor]):
        """features: per level (N, C, Hi, Wi). Returns three lists (logits, deltas, representations)."""
        logits, deltas, reps = [], [], []
        for feature in features:
            logits.append(self.cls_score(self.cls_tower(feature)))
            deltas.append(self.bbox_pred(self.bbox_tower(feature)))
            reps.append(self.rep_pred(self.rep_tower(feature)))
        return logits, deltas, reps
