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
    out = features[0].new_zeros((levels.shape[0], conv.out_channels))
    weight = conv.weight.flatten(1)  # (K, C * 9), ordered (channel, kernel row, kernel column)
    bias = conv.bias if conv.bias is not None else weight.new_zeros(conv.out_channels)
    window = torch.arange(3, device=levels.device)
    for level, feature in enumerate(features):
        inds = torch.nonzero(levels == level).squeeze(1)
        # Padded by 1, the conv's 3x3 window at (row, col) covers padded rows row..row + 2, columns col..col + 2.
        padded = F.pad(feature, (1, 1, 1, 1))
        patches = padded[image_inds[inds, None, None], :, rows[inds, None, None] + window[None, :, None],
                         cols[inds, None, None] + window[None, None, :]]  # (n_level, 3, 3, C)
        # index_copy, not ``out[inds] = ...``: traced, the latter fixes the row count of the traced image.
        out = out.index_copy(0, inds, patches.permute(0, 3, 1, 2).flatten(1) @ weight.T + bias)
    return out
