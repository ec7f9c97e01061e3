import re

import torch.nn.functional as F
from torch import nn
from detectron2.layers import Conv2d, get_norm

_REFERENCE_BLOCK_KEY = re.compile(r"(\w+)\.(\d+)\.([01])\.(\w+)")


def conv_norm_relu(in_channels, out_channels, norm):
    """3x3 conv (bias only without a norm) + norm + ReLU with kaiming-uniform (a=1) init: the conv block of
    AdelaiDet's heads (CondInst's mask branch, BlendMask's basis module), as one Detectron2 ``Conv2d``.

    Parameters: ``weight``, ``bias`` (without a norm) and ``norm.*``; AdelaiDet names the same block
    ``0.*`` (conv) and ``1.*`` (norm): see :func:`conv_norm_relu_reference_key`.
    """
    conv = Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=not norm,
                  norm=get_norm(norm, out_channels), activation=F.relu)
    nn.init.kaiming_uniform_(conv.weight, a=1)
    if conv.bias is not None:
        nn.init.constant_(conv.bias, 0.0)
    return conv


def conv_norm_relu_reference_key(name, module_names):
    """Our name of an AdelaiDet key ``{module}.{i}.0.{param}`` (conv) or ``{module}.{i}.1.{param}`` (norm)
    of a list of :func:`conv_norm_relu` blocks called one of ``module_names``; None for other keys."""
    match = _REFERENCE_BLOCK_KEY.fullmatch(name)
    if match is None or match.group(1) not in module_names:
        return None
    module, index, position, param = match.groups()
    return f"{module}.{index}.{'norm.' if position == '1' else ''}{param}"
