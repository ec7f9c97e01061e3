"""Building blocks of the SOLO family's branches: conv towers, predictor initialisation, level resizing."""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from detectron2.layers import Conv2d, get_norm

from d2ext.layers import coordinate_features


def conv_tower(in_channels, channels, num_convs, norm):
    """``num_convs`` x (3x3 conv, norm, ReLU), initialised N(0, 0.01). Bias only without a norm."""
    layers = []
    for i in range(num_convs):
        conv = Conv2d(in_channels if i == 0 else channels, channels, kernel_size=3, padding=1,
                      bias=not norm, norm=get_norm(norm, channels), activation=F.relu)
        init_conv(conv)
        layers.append(conv)
    return nn.Sequential(*layers)


def init_conv(conv, prior_prob=None):
    """N(0, 0.01) weights; bias 0, or -log((1 - p) / p) so that sigmoid outputs start at ``prior_prob``."""
    nn.init.normal_(conv.weight, std=0.01)
    if conv.bias is not None:
        bias = 0.0 if prior_prob is None else -math.log((1 - prior_prob) / prior_prob)
        nn.init.constant_(conv.bias, bias)
    return conv


def resize_instance_levels(features):
    """The reference's level resizing: the first (finest) level halved, the last resized to the size of
    the one before it (P2 -> stride 8, P6 -> P5's size); bilinear.

    Args:
        features: list of (B, C, H_l, W_l), finest first (at least two levels).
    Returns:
        list of the same length.
    """
    if len(features) < 2:
        raise ValueError(f"SOLO needs at least two instance levels, got {len(features)}")
    resized = list(features)
    resized[0] = F.interpolate(features[0], scale_factor=0.5, mode="bilinear", align_corners=False)
    resized[-1] = F.interpolate(features[-1], size=features[-2].shape[-2:], mode="bilinear", align_corners=False)
    return resized


def resized_instance_strides(strides):
    """The strides of :func:`resize_instance_levels`' output, given those of its input levels."""
    return [2 * strides[0], *strides[1:-1], strides[-2]]


def with_coordinates(x, which=(0, 1)):
    """Append CoordConv channels (x then y in [-1, 1]; ``which`` selects them) to (B, C, H, W)."""
    coords = coordinate_features(x.shape[-2], x.shape[-1], device=x.device, dtype=x.dtype)[list(which)]
    return torch.cat([x, coords[None].expand(x.shape[0], -1, -1, -1)], dim=1)


def upsample2x(x):
    """(B, C, H, W) -> (B, C, 2H, 2W), bilinear (the reference's x2 upsampling)."""
    return F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)


