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
from d2ext.layers import conv3x3_at_cells, run_towers

from .correlation import object_rep_length


def _tower(in_channels, num_convs, norm):
    """``num_convs`` x (3x3 conv, norm, ReLU); biases only without norm."""
    layers = [
        Conv2d(in_channels, in_channels, kernel_size=3, padding=1, bias=not norm,
               norm=get_norm(norm, in_channels), activation=F.relu)
        for _ in range(num_convs)
    ]
    return nn.Sequential(*layers)


def level_anchor_positions(level_inds, width, num_anchors):
    """Indices into one level's anchors (row, column, anchor order; ``width`` columns: an int, or (n,) per index
    when the indices come from several levels) -> their (row, column) cells (n, 2) and indices among their
    cell's anchors (n,)."""
    cells = torch.div(level_inds, num_anchors, rounding_mode="floor")
    rows = torch.div(cells, width, rounding_mode="floor")
    return torch.stack([rows, cells % width], dim=1), level_inds % num_anchors


class RDSNetHead(nn.Module):
    """Per level: class logits (N, A*K, H, W), box deltas (N, A*4, H, W) and the representation tower's
    features (N, C, H, W). The object representations, ``rep_pred`` on those features ((N, A*2*L, H, W),
    channel a*2L + s*L + k holding anchor a's slot s: 0 = background, 1 = foreground; L = ``rep_dim``, which is
    ``object_rep_length``: d, or d + 4 with the box coordinate terms), are read at a few
    anchors only (the positives in training, the detections at inference), so :meth:`object_representations`
    computes them there instead of on every location (A*2*d = 576 channels for the R-50 models)."""

    @configurable
    def __init__(self, *, in_channels, num_anchors, num_classes, rep_dim, num_convs=4, norm="GN",
                 prior_prob=0.01):
        super().__init__()
        if rep_dim <= 0:
            raise ValueError(f"MODEL.RDSNET.REP_DIM must be positive, got {rep_dim}")
        self.num_anchors = num_anchors
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
            "rep_dim": object_rep_length(cfg.MODEL.RDSNET.REP_DIM, cfg.MODEL.RDSNET.BOX_COORD_TERMS),
            "num_convs": cfg.MODEL.RETINANET.NUM_CONVS,
            "norm": cfg.MODEL.RDSNET.HEAD_NORM,
            "prior_prob": cfg.MODEL.RETINANET.PRIOR_PROB,
        }

    def forward(self, features: List[torch.Tensor]):
        """features: per level (N, C, Hi, Wi). Returns three lists (logits, deltas, representation-tower
        features)."""
        cls_features, box_features, rep_features = run_towers([self.cls_tower, self.bbox_tower, self.rep_tower],
                                                              features)
        logits = [self.cls_score(f) for f in cls_features]
        deltas = [self.bbox_pred(f) for f in box_features]
        return logits, deltas, rep_features

    def anchor_positions(self, rep_features: List[torch.Tensor], anchor_inds):
        """Indices into the anchors of all levels, in RetinaNet's order (level, row, column, anchor) -> each
        anchor's level (n,), (row, column) cell (n, 2) and index among its cell's anchors (n,)."""
        device = anchor_inds.device
        sizes = torch.tensor([f.shape[-2] * f.shape[-1] * self.num_anchors for f in rep_features], device=device)
        widths = torch.tensor([f.shape[-1] for f in rep_features], device=device)
        ends = sizes.cumsum(0)
        levels = (anchor_inds[:, None] >= ends).sum(dim=1)
        cells, anchors = level_anchor_positions(anchor_inds - (ends - sizes)[levels], widths[levels], self.num_anchors)
        return levels, cells, anchors

    def object_representations(self, rep_features: List[torch.Tensor], image_inds, levels, cells, anchors):
        """``rep_pred`` at a few anchors, equal to the dense map's entries (up to float summation order).

        Args:
            rep_features: per level (N, C, Hi, Wi), :meth:`forward`'s third output.
            image_inds, levels: (n,) each anchor's image and level.
            cells: (n, 2) each anchor's (row, column) on its level.
            anchors: (n,) each anchor's index among its cell's A anchors.
        Returns:
            (n, 2, d): slot 0 the background kernel, slot 1 the foreground one.
        """
        reps = conv3x3_at_cells(self.rep_pred, rep_features, image_inds, levels, *cells.unbind(dim=1))
        per_anchor = reps.view(reps.shape[0], self.num_anchors, 2 * self.rep_dim)
        chosen = per_anchor.gather(1, anchors[:, None, None].expand(-1, 1, per_anchor.shape[2]))
        return chosen.view(-1, 2, self.rep_dim)
