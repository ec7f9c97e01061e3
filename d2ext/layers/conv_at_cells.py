"""A 3x3 conv evaluated at a few cells of multi-level feature maps, without its dense output."""
from typing import List

import torch
from torch import nn
from torch.nn import functional as F


def is_conv3x3(module):
    """Whether ``module`` is a 3x3, stride-1, zero-padded (1), undilated, ungrouped ``nn.Conv2d`` with no norm
    or activation of its own (Detectron2's ``Conv2d`` may have both): what :func:`conv3x3_at_cells` evaluates."""
    return (isinstance(module, nn.Conv2d) and module.kernel_size == (3, 3) and module.stride == (1, 1)
            and module.padding == (1, 1) and module.dilation == (1, 1) and module.groups == 1
            and module.padding_mode == "zeros" and getattr(module, "norm", None) is None
            and getattr(module, "activation", None) is None)


def conv3x3_at_cells(conv, features: List[torch.Tensor], image_inds, levels, rows, cols):
    """``conv(features[level])[image, :, row, col]`` at a few cells, without the dense output (equal up to
    float summation order, gradients included). Output layers with many channels are read at a few cells
    only: BlendMask's top layer (784 channels) and CondInst's controller (169) at the FCOS positives and
    detections, RDSNet's object representations (anchors x 2d = 576) at the positive anchors and detections.

    Args:
        conv: a conv for which :func:`is_conv3x3` holds.
        features: per level, (N, C, H_l, W_l).
        image_inds, levels, rows, cols: (n,) each cell's image in the batch, level and position.
    Returns:
        (n, K) outputs, K = ``conv.out_channels``.
    """
    weight = conv.weight.flatten(1)  # (K, C * 9), ordered (channel, kernel row, kernel column)
    # Every level padded by 1 and flattened, side by side: the conv's 3x3 window at (row, col) of a level covers
    # padded rows row..row + 2, columns col..col + 2, i.e. flat positions start + (row + dy) * (W + 2) + col + dx.
    # One gather for all levels: a loop over the levels would launch ~10 kernels and read the GPU once per level.
    flat = torch.cat([F.pad(feature, (1, 1, 1, 1)).flatten(2) for feature in features], dim=2)  # (N, C, S)
    padded_widths = torch.zeros_like(rows)
    starts = torch.zeros_like(rows)
    start = 0
    for level, feature in enumerate(features):  # per cell, its level's padded width and start (traced: dynamic)
        on_level = levels == level
        padded_widths = torch.where(on_level, feature.shape[-1] + 2, padded_widths)
        starts = torch.where(on_level, start, starts)
        start = start + (feature.shape[-2] + 2) * (feature.shape[-1] + 2)
    window = torch.arange(3, device=levels.device)
    corners = starts + rows * padded_widths + cols  # (n,) each window's top-left position
    positions = corners[:, None, None] + window[None, :, None] * padded_widths[:, None, None] + window  # (n, 3, 3)
    patches = flat[image_inds[:, None, None], :, positions]  # (n, 3, 3, C)
    out = patches.permute(0, 3, 1, 2).flatten(1) @ weight.T
    return out + conv.bias if conv.bias is not None else out
