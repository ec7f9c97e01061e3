import math
import re
from typing import Dict, List

import torch
import torch.nn.functional as F
from torch import nn
from detectron2.config import configurable
from detectron2.layers import Conv2d, ShapeSpec, get_norm

from d2ext.layers import ReferenceCheckpointMixin, conv3x3_at_cells, run_towers

# AdelaiDet's names of the head's submodules -> ours (Detectron2's RetinaNet / FCOS names).
_ADELAIDET_TOWERS = {"share_tower": "share_subnet", "cls_tower": "cls_subnet", "bbox_tower": "bbox_subnet"}
_ADELAIDET_PREDICTORS = {"cls_logits": "cls_score", "bbox_pred": "bbox_pred", "ctrness": "ctrness",
                         "centerness": "ctrness"}  # "centerness": checkpoints from before April 2020


class Scale(nn.Module):
    """A learnable scalar multiplier (one per FPN level on FCOS's regression)."""

    def __init__(self, init_value=1.0):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor([float(init_value)]))

    def forward(self, x):
        return x * self.scale


def top_feats_conv(backbone_shape: Dict[str, ShapeSpec], out_channels):
    """A ``top_module`` for ``FCOS.predict``: the 3x3 conv that CondInst's controller and BlendMask's top
    layer run on each level's box tower, (N, C, H, W) -> (N, out_channels, H, W), C the backbone's channels
    (the same on every level). Weights N(0, 0.01), zero bias."""
    tower_channels = {s.channels for s in backbone_shape.values()}.pop()
    conv = nn.Conv2d(tower_channels, out_channels, kernel_size=3, padding=1)
    nn.init.normal_(conv.weight, std=0.01)
    nn.init.constant_(conv.bias, 0.0)
    return conv


def top_feats_at_locations(conv, box_towers: List[torch.Tensor], image_inds, fpn_levels, locations,
                           strides: List[int]):
    """The output of a :func:`top_feats_conv` at a few FCOS locations, without the dense map: training needs
    it at the positive locations only and inference at the detections' (``d2ext.layers.conv3x3_at_cells``).

    Args:
        conv: a conv for which ``d2ext.layers.is_conv3x3`` holds.
        box_towers: per level, (N, D, Hl, Wl) box-tower features of the batch.
        image_inds: (n,) each location's image in the batch.
        fpn_levels: (n,) each location's level.
        locations: (n, 2) (x, y) image coordinates, ``stride * index + stride // 2`` (``compute_locations``).
        strides: per level, its stride.
    Returns:
        (n, K) features, K = ``conv.out_channels``.
    """
    stride = torch.as_tensor(strides, device=locations.device)[fpn_levels]
    cols, rows = ((locations - (stride // 2)[:, None]) / stride[:, None]).round().long().unbind(dim=1)
    return conv3x3_at_cells(conv, box_towers, image_inds, fpn_levels, rows, cols)


class FCOSHead(ReferenceCheckpointMixin, nn.Module):
    """FCOS's shared dense head: classification and box towers, then per-location predictors.

    The centerness (or IoU-quality) predictor runs on the box tower. Box regression is
    ``relu(scale_l * x)`` (``exp`` without USE_RELU), in units of the level's stride.
    ``forward`` also returns the box-tower features, on which CondInst's controller and BlendMask's
    attention layer run.
    """

    # Unversioned checkpoints use AdelaiDet's names (cls_tower, cls_logits, centerness, ...).
    _reference_source = "AdelaiDet"

    @configurable
    def __init__(self, *, input_shape: List[ShapeSpec], num_classes, num_cls_convs=4, num_box_convs=4,
                 num_share_convs=0, norm="GN", prior_prob=0.01, use_scale=True, use_relu=True):
        """
        Args:
            input_shape: shapes of the input features (same channels on every level).
            num_classes: foreground classes.
            num_cls_convs, num_box_convs, num_share_convs: convs of each tower (3x3, norm, ReLU).
            norm: tower normalisation (see ``detectron2.layers.get_norm``); "" for none.
            prior_prob: initial foreground probability of the classification logits.
            use_scale: a learnable scale per level on the regression.
            use_relu: regression = relu(scale * x) (else exp(scale * x)).
        """
        super().__init__()
        channels = {s.channels for s in input_shape}
        if len(channels) != 1:
            raise ValueError(f"FCOSHead needs the same channels on every input level, got {sorted(channels)}")
        in_channels = channels.pop()
        self.num_classes = num_classes
        self.use_relu = use_relu
        self._modules_per_tower_layer = 3 if norm else 2  # AdelaiDet's towers: conv, (norm,) ReLU
        self.share_subnet = self._tower(num_share_convs, in_channels, norm)
        self.cls_subnet = self._tower(num_cls_convs, in_channels, norm)
        self.bbox_subnet = self._tower(num_box_convs, in_channels, norm)
        self.cls_score = nn.Conv2d(in_channels, num_classes, kernel_size=3, padding=1)
        self.bbox_pred = nn.Conv2d(in_channels, 4, kernel_size=3, padding=1)
        self.ctrness = nn.Conv2d(in_channels, 1, kernel_size=3, padding=1)
        self.scales = nn.ModuleList([Scale(1.0) for _ in input_shape]) if use_scale else None

        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, std=0.01)
                nn.init.constant_(module.bias, 0.0)
        nn.init.constant_(self.cls_score.bias, -math.log((1 - prior_prob) / prior_prob))

    @staticmethod
    def _tower(num_convs, channels, norm):
        return nn.Sequential(*[
            Conv2d(channels, channels, kernel_size=3, padding=1, bias=True, norm=get_norm(norm, channels),
                   activation=F.relu)
            for _ in range(num_convs)
        ])

    @classmethod
    def from_config(cls, cfg, input_shape: List[ShapeSpec]):
        if cfg.MODEL.FCOS.USE_DEFORMABLE:
            raise ValueError("MODEL.FCOS.USE_DEFORMABLE=True is not supported by adet_lite's FCOS head")
        return {
            "input_shape": input_shape,
            "num_classes": cfg.MODEL.FCOS.NUM_CLASSES,
            "num_cls_convs": cfg.MODEL.FCOS.NUM_CLS_CONVS,
            "num_box_convs": cfg.MODEL.FCOS.NUM_BOX_CONVS,
            "num_share_convs": cfg.MODEL.FCOS.NUM_SHARE_CONVS,
            "norm": cfg.MODEL.FCOS.NORM,
            "prior_prob": cfg.MODEL.FCOS.PRIOR_PROB,
            "use_scale": cfg.MODEL.FCOS.USE_SCALE,
            "use_relu": cfg.MODEL.FCOS.USE_RELU,
        }

    def forward(self, features: List[torch.Tensor]):
        """
        Args:
            features: L tensors (N, C, Hl, Wl), one per level.
        Returns:
            logits: L tensors (N, num_classes, Hl, Wl).
            bbox_reg: L tensors (N, 4, Hl, Wl): non-negative (left, top, right, bottom) distances in
                units of the level's stride.
            ctrness: L tensors (N, 1, Hl, Wl): centerness (or IoU-quality) logits.
            bbox_towers: L tensors (N, C, Hl, Wl): the box-tower features.
        """
        logits, bbox_reg, ctrness = [], [], []
        cls_towers, bbox_towers = run_towers([self.cls_subnet, self.bbox_subnet],
                                             [self.share_subnet(feature) for feature in features])
        for level, (cls_tower, bbox_tower) in enumerate(zip(cls_towers, bbox_towers)):
            logits.append(self.cls_score(cls_tower))
            ctrness.append(self.ctrness(bbox_tower))
            # fp32 under autocast, as a Scale's fp32 product makes it: the losses mix it with fp32 targets.
            reg = self.bbox_pred(bbox_tower).float()
            if self.scales is not None:
                reg = self.scales[level](reg)
            bbox_reg.append(F.relu(reg) if self.use_relu else torch.exp(reg))
        return logits, bbox_reg, ctrness, bbox_towers

    def _rename_reference_key(self, name):
        """AdelaiDet name (relative to the head) -> ours, or None."""
        match = re.fullmatch(r"(share_tower|cls_tower|bbox_tower)\.(\d+)\.(\w+)", name)
        if match:
            tower, index, param = match.group(1), int(match.group(2)), match.group(3)
            layer, position = divmod(index, self._modules_per_tower_layer)
            if position == 0:
                return f"{_ADELAIDET_TOWERS[tower]}.{layer}.{param}"
            if position == 1 and self._modules_per_tower_layer == 3:
                return f"{_ADELAIDET_TOWERS[tower]}.{layer}.norm.{param}"
            return None
        match = re.fullmatch(r"(cls_logits|bbox_pred|ctrness|centerness)\.(weight|bias)", name)
        if match:
            return f"{_ADELAIDET_PREDICTORS[match.group(1)]}.{match.group(2)}"
        return None
