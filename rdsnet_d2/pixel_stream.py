"""Pixel stream: P3-P5 merged at stride 8 (PanopticFPN style), upsampled to stride 4, 1x1 conv to the
d-dimensional pixel representations that the object kernels correlate with."""
from typing import Dict, List

import torch
from detectron2.config import configurable
from detectron2.layers import Conv2d, ShapeSpec, get_norm
from torch import nn
from torch.nn import functional as F

from d2ext.config_checks import check_in_features


def _upsample2x(x):
    # The official pixel stream upsamples with align_corners=True.
    return F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True)


class PixelStream(nn.Module):
    """Level i (0 = finest) gets max(i, 1) convs, with a 2x upsampling after each of its first i convs;
    the sum (stride of the finest level) goes through one more conv, 2x upsampling and a 1x1 conv."""

    @configurable
    def __init__(self, *, in_features: List[str], in_channels, conv_dim, rep_dim, norm="GN"):
        super().__init__()
        self.in_features = list(in_features)

        def conv(c_in):
            return Conv2d(c_in, conv_dim, kernel_size=3, padding=1, bias=not norm,
                          norm=get_norm(norm, conv_dim), activation=F.relu)

        self.level_convs = nn.ModuleList()
        for level in range(len(self.in_features)):
            convs = [conv(in_channels if j == 0 else conv_dim) for j in range(max(level, 1))]
            self.level_convs.append(nn.ModuleList(convs))
        self.fuse_conv = conv(conv_dim)
        self.pixel_rep = nn.Conv2d(conv_dim, rep_dim, kernel_size=1)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        nn.init.normal_(self.pixel_rep.weight, std=0.01)

    @classmethod
    def from_config(cls, cfg, input_shape: Dict[str, ShapeSpec]):
        in_features = cfg.MODEL.RDSNET.PIXEL_IN_FEATURES
        check_in_features("MODEL.RDSNET.PIXEL_IN_FEATURES", in_features, input_shape)
        strides = [input_shape[f].stride for f in in_features]
        if any(b != 2 * a for a, b in zip(strides, strides[1:])):
            raise ValueError(f"MODEL.RDSNET.PIXEL_IN_FEATURES must be consecutive levels (strides x2), "
                             f"got strides {strides}")
        return {
            "in_features": in_features,
            "in_channels": input_shape[in_features[0]].channels,
            "conv_dim": cfg.MODEL.RDSNET.PIXEL_CONV_DIM,
            "rep_dim": cfg.MODEL.RDSNET.REP_DIM,
            "norm": cfg.MODEL.RDSNET.PIXEL_NORM,
        }

    def forward(self, features: Dict[str, torch.Tensor]):
        """features: name -> (N, C, Hi, Wi). Returns (N, d, H0 * 2, W0 * 2): at half the finest stride."""
        merged = None
        for level, (name, convs) in enumerate(zip(self.in_features, self.level_convs)):
            x = features[name]
            for j, conv in enumerate(convs):
                x = conv(x)
                if j < level:
                    x = _upsample2x(x)
            merged = x if merged is None else merged + x
        return self.pixel_rep(_upsample2x(self.fuse_conv(merged)))
