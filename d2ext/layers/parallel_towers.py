"""Several conv towers of one shape, reading the same input, run as one wide tower.

Dense heads (RetinaNet-style, FCOS) run k towers of (3x3 conv, norm, activation) layers on every level; at
batch 1 on a GPU their cost is the number of kernels launched, not arithmetic. k towers whose layers match
run as one: the first layer as one conv with the k weights stacked (k*C outputs), the later ones as grouped
convs (groups=k, tower t's channels in group t) and GroupNorm over k*G groups, which equals each tower's own
GroupNorm(G) because groups are contiguous channel blocks. The towers keep their own parameters (and
checkpoint keys); the stacked ones are concatenated per call, so gradients reach each tower's. By default only
on a GPU: on a CPU, where time follows arithmetic, grouped convs were slower than the towers apart.
"""
from typing import List, Optional, Sequence

import torch
from torch import nn
from torch.nn import functional as F


def _merge_key(layer):
    """What must agree between the towers' layers at one depth for them to run as one; None if ``layer`` is
    not a plain 3x3-style conv with an optional GroupNorm (Detectron2's ``Conv2d``) or has groups itself."""
    if not isinstance(layer, nn.Conv2d) or layer.groups != 1 or layer.padding_mode != "zeros":
        return None
    norm = getattr(layer, "norm", None)
    if norm is None:
        norm_key = None
    elif type(norm) is nn.GroupNorm and norm.affine:
        norm_key = (norm.num_groups, norm.eps)
    else:  # BatchNorm variants: their statistics would have to be written back per tower
        return None
    return (layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, layer.padding, layer.dilation,
            layer.bias is not None, norm_key, getattr(layer, "activation", None))


def can_run_as_one(towers: Sequence[nn.Sequential]):
    """Whether :func:`run_towers` merges ``towers``: at least two, of equal non-zero depth, whose layers at
    each depth are convs (groups 1, no norm or an affine GroupNorm) of one shape, norm and activation, the
    first reading C channels and the rest C -> C (so that tower t's activations form group t)."""
    if len(towers) < 2 or len({len(t) for t in towers}) != 1 or len(towers[0]) == 0:
        return False
    for depth, layers in enumerate(zip(*towers)):
        keys = {_merge_key(layer) for layer in layers}
        if len(keys) != 1 or None in keys:
            return False
        if depth > 0 and layers[0].in_channels != layers[0].out_channels:
            return False
    return True


def _stacked_parameters(layers):
    """The k layers' parameters at one depth, concatenated: (weight, bias or None, norm weight, norm bias)."""
    first = layers[0]
    weight = torch.cat([layer.weight for layer in layers])
    bias = torch.cat([layer.bias for layer in layers]) if first.bias is not None else None
    if getattr(first, "norm", None) is None:
        return weight, bias, None, None
    return (weight, bias, torch.cat([layer.norm.weight for layer in layers]),
            torch.cat([layer.norm.bias for layer in layers]))


def run_towers(towers: Sequence[nn.Sequential], features: List[torch.Tensor], merge: Optional[bool] = None):
    """Each tower on each level: ``[[tower(f) for f in features] for tower in towers]``, equal up to float
    summation order (gradients included), computed as one wide tower when ``merge`` and :func:`can_run_as_one`.

    Args:
        towers: k ``nn.Sequential`` of Detectron2 ``Conv2d`` layers, all reading the same input.
        features: per level, (N, C, H_l, W_l).
        merge: run mergeable towers as one; None: on a GPU only. On a GPU at batch 1 the towers' cost is their
            kernel launches, which merging divides by k; on a CPU the cost is arithmetic, and oneDNN's grouped
            convs were slower than k dense ones (RDSNet's three R-50 towers at 800 x 1333, 2 threads: 2.6-3.0 s
            merged vs 2.1-2.2 s apart).
    Returns:
        per tower, per level, (N, C', H_l, W_l) (channel slices of the wide tower's output).
    """
    if merge is None:
        merge = features[0].is_cuda if features else False
    if not merge or not can_run_as_one(towers):
        return [[tower(feature) for feature in features] for tower in towers]
    k = len(towers)
    depths = [(layers[0], getattr(layers[0], "norm", None), getattr(layers[0], "activation", None),
               _stacked_parameters(layers)) for layers in zip(*towers)]
    outputs = []
    for feature in features:
        x = feature
        for depth, (conv, norm, activation, (weight, bias, norm_weight, norm_bias)) in enumerate(depths):
            x = F.conv2d(x, weight, bias, conv.stride, conv.padding, conv.dilation, 1 if depth == 0 else k)
            if norm is not None:
                x = F.group_norm(x, norm.num_groups * k, norm_weight, norm_bias, norm.eps)
            if activation is not None:
                x = activation(x)
        outputs.append(x.chunk(k, dim=1))
    return [list(per_tower) for per_tower in zip(*outputs)]
