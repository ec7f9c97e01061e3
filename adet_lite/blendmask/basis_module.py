"""BlendMask's bottom module: K bases at stride 4 from P3-P5 (ProtoNet), optional semantic loss."""
import logging
import re
from typing import Dict, List

import torch
import torch.nn.functional as F
from torch import nn
from detectron2.config import configurable
from detectron2.layers import ShapeSpec
from detectron2.utils import comm
from detectron2.utils.registry import Registry

from d2ext.config_checks import check_in_features, check_norm, check_values
from d2ext.layers import ReferenceCheckpointMixin, conv_norm_relu, conv_norm_relu_reference_key

from .config import BASIS_MODULE_REQUIREMENTS

BASIS_MODULE_REGISTRY = Registry("BASIS_MODULE")
BASIS_MODULE_REGISTRY.__doc__ = """
Registry for BlendMask's basis (bottom) modules, selected by ``MODEL.BASIS_MODULE.NAME``. Called with
``(cfg, input_shape)``; forward ``(features, semantic_targets=None) -> (bases, losses)``.
"""

logger = logging.getLogger(__name__)

# AdelaiDet's semantic head is one flat Sequential: conv, BN, ReLU, conv, BN, ReLU, 1x1 conv.
_REFERENCE_SEMANTIC_KEY = re.compile(r"seg_head\.(\d+)\.(\w+)")
_BN_PARAMS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
_REFERENCE_SEMANTIC_KEYS = (("seg_head.0.weight", "seg_head.3.weight", "seg_head.6.weight", "seg_head.6.bias")
                            + tuple(f"seg_head.{i}.{p}" for i in (1, 4) for p in _BN_PARAMS))


def build_basis_module(cfg, input_shape: Dict[str, ShapeSpec]):
    return BASIS_MODULE_REGISTRY.get(cfg.MODEL.BASIS_MODULE.NAME)(cfg, input_shape)


def single_process_norm(norm):
    """``"SyncBN"`` -> ``"BN"`` when not distributed.

    AdelaiDet's basis module defaults to SyncBN, which fails in training outside a process group
    (one CPU / GPU process); in one process plain BN computes the same statistics. Both have the
    same parameter and buffer names, so checkpoints load either way.
    """
    if norm == "SyncBN" and comm.get_world_size() == 1:
        logger.info("MODEL.BASIS_MODULE.NORM 'SyncBN' runs as 'BN' in a single process")
        return "BN"
    return norm


@BASIS_MODULE_REGISTRY.register()
class ProtoNet(ReferenceCheckpointMixin, nn.Module):
    """Bases from FPN features (YOLACT's ProtoNet, AdelaiDet's BlendMask bottom module).

    ``in_features`` are refined (3x3 conv + norm + ReLU to ``channels``) and summed at the resolution
    of the first one after bilinear upsampling; a tower of ``num_convs`` convs, x2 bilinear upsampling,
    one more conv and a 1x1 conv give ``num_bases`` maps at half the first feature's stride (4 for P3).
    With ``loss_on``, a semantic head (2 convs + BN + ReLU, 1x1 to num_classes + 1) on the first
    feature is trained with cross-entropy against thing maps (0 = background, class c = c + 1).
    """

    _reference_source = "AdelaiDet"

    @configurable
    def __init__(self, *, input_shape: Dict[str, ShapeSpec], in_features: List[str], num_bases=4, channels=128,
                 norm="BN", num_convs=3, loss_on=False, num_classes=80, loss_weight=0.3):
        super().__init__()
        self.in_features = list(in_features)
        self.out_stride = input_shape[self.in_features[0]].stride // 2
        self.refine = nn.ModuleList([conv_norm_relu(input_shape[f].channels, channels, norm) for f in in_features])
        predictor = nn.Conv2d(channels, num_bases, kernel_size=1)
        # Indices as AdelaiDet's tower (convs, upsampling, conv, predictor): checkpoints keep their names.
        self.tower = nn.Sequential(*[conv_norm_relu(channels, channels, norm) for _ in range(num_convs)],
                                   nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
                                   conv_norm_relu(channels, channels, norm),
                                   predictor)
        self.loss_on = loss_on
        if loss_on:
            self.num_classes = num_classes
            self.loss_weight = loss_weight
            # BN whatever ``norm`` is: AdelaiDet's semantic head always uses BatchNorm2d.
            self.semantic_tower = nn.Sequential(
                conv_norm_relu(input_shape[self.in_features[0]].channels, channels, "BN"),
                conv_norm_relu(channels, channels, "BN"))
            self.semantic_logits = nn.Conv2d(channels, num_classes + 1, kernel_size=1)

    @classmethod
    def from_config(cls, cfg, input_shape: Dict[str, ShapeSpec]):
        basis = cfg.MODEL.BASIS_MODULE
        check_values(basis, "MODEL.BASIS_MODULE", BASIS_MODULE_REQUIREMENTS)
        check_in_features("MODEL.BASIS_MODULE.IN_FEATURES", basis.IN_FEATURES, input_shape)
        check_norm("MODEL.BASIS_MODULE.NORM", basis.NORM,
                   {"MODEL.BASIS_MODULE.CONVS_DIM": basis.CONVS_DIM})
        first_stride = input_shape[basis.IN_FEATURES[0]].stride
        if basis.LOSS_ON and basis.COMMON_STRIDE != first_stride:
            raise ValueError(f"MODEL.BASIS_MODULE.COMMON_STRIDE {basis.COMMON_STRIDE} must equal the stride "
                             f"{first_stride} of IN_FEATURES[0] {basis.IN_FEATURES[0]!r} (the semantic head's)")
        return {
            "input_shape": input_shape,
            "in_features": basis.IN_FEATURES,
            "num_bases": basis.NUM_BASES,
            "channels": basis.CONVS_DIM,
            "norm": single_process_norm(basis.NORM),
            "num_convs": basis.NUM_CONVS,
            "loss_on": basis.LOSS_ON,
            "num_classes": basis.NUM_CLASSES,
            "loss_weight": basis.LOSS_WEIGHT,
        }

    def forward(self, features: Dict[str, torch.Tensor], semantic_targets=None):
        """
        Args:
            features: backbone features (those of ``in_features``).
            semantic_targets: training with ``loss_on`` only: (N, H, W) int64 class maps in [0, num_classes]
                (0 = background) at the resolution of ``in_features[0]``.
        Returns:
            bases: (N, num_bases, 2H, 2W) at ``out_stride``.
            losses: {"loss_basis_sem": ...} in training with ``loss_on``, else {}.
        """
        x = self.refine[0](features[self.in_features[0]])
        for refine, name in zip(self.refine[1:], self.in_features[1:]):
            x = x + F.interpolate(refine(features[name]), size=x.shape[-2:], mode="bilinear", align_corners=False)
        bases = self.tower(x)

        losses = {}
        if self.training and self.loss_on:
            if semantic_targets is None:
                raise ValueError("ProtoNet with MODEL.BASIS_MODULE.LOSS_ON needs semantic targets in training")
            logits = self.semantic_logits(self.semantic_tower(features[self.in_features[0]]))
            if semantic_targets.shape != (logits.shape[0], *logits.shape[-2:]):
                raise ValueError(f"semantic targets {tuple(semantic_targets.shape)} do not match the semantic "
                                 f"logits {tuple(logits.shape)}")
            losses["loss_basis_sem"] = self.loss_weight * F.cross_entropy(logits, semantic_targets)
        return bases, losses

    def _rename_reference_key(self, name):
        renamed = conv_norm_relu_reference_key(name, ("refine", "tower"))
        if renamed is not None:
            return renamed
        match = _REFERENCE_SEMANTIC_KEY.fullmatch(name)
        if match:
            index, param = int(match.group(1)), match.group(2)
            if index == 6:
                return f"semantic_logits.{param}"
            block, position = divmod(index, 3)
            if position == 0:
                return f"semantic_tower.{block}.{param}"
            if position == 1:
                return f"semantic_tower.{block}.norm.{param}"
        return None

    def _ignored_reference_keys(self):
        # The semantic head only trains; without LOSS_ON its AdelaiDet weights have no place here.
        return () if self.loss_on else _REFERENCE_SEMANTIC_KEYS
