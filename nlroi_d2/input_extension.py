"""The first layer after an NL-RoI block: a stock conv / fc layer that also reads the Dg appended channels.

Its weight is stored in two parameters: the stock ``weight`` (shape of the plain model's layer, so a
Detectron2 model-zoo checkpoint loads into it unchanged) and ``nonlocal_weight`` for the appended
channels, initialised to zero. A plain checkpoint therefore reproduces the plain model exactly: the
layer computes ``stock(x) + 0``. Only ``nonlocal_weight`` is reported missing when loading one.
"""
import torch
from torch import nn
from torch.nn import functional as F

from detectron2.layers import Conv2d


class ExtendedInputConv2d(Conv2d):
    """Detectron2 ``Conv2d`` (with its norm and activation) over ``cat([x, extra], dim=1)``.

    ``weight``: (C_out, C_in, k, k) as in the plain layer; ``nonlocal_weight``: (C_out, C_extra, k, k).
    """

    def __init__(self, *args, extra_in_channels: int, **kwargs):
        super().__init__(*args, **kwargs)
        if self.groups != 1:
            raise ValueError("ExtendedInputConv2d supports groups=1 only.")
        self.extra_in_channels = extra_in_channels
        self.nonlocal_weight = nn.Parameter(
            torch.zeros(self.out_channels, extra_in_channels, *self.kernel_size, dtype=self.weight.dtype)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (N, C_in + C_extra, H, W) -> (N, C_out, H', W')."""
        stock_input, extra_input = x.split([self.in_channels, self.extra_in_channels], dim=1)
        conv_args = (self.stride, self.padding, self.dilation)
        x = F.conv2d(stock_input, self.weight, self.bias, *conv_args)
        x = x + F.conv2d(extra_input, self.nonlocal_weight, None, *conv_args)
        if self.norm is not None:
            x = self.norm(x)
        if self.activation is not None:
            x = self.activation(x)
        return x


class ExtendedInputLinear(nn.Linear):
    """``nn.Linear`` over ``cat([x, extra], dim=1)``: ``weight`` (out, in) stock, ``nonlocal_weight`` (out, extra)."""

    def __init__(self, in_features: int, out_features: int, *, extra_in_features: int, bias: bool = True):
        super().__init__(in_features, out_features, bias=bias)
        self.extra_in_features = extra_in_features
        self.nonlocal_weight = nn.Parameter(torch.zeros(out_features, extra_in_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (N, in + extra) -> (N, out)."""
        stock_input, extra_input = x.split([self.in_features, self.extra_in_features], dim=1)
        return F.linear(stock_input, self.weight, self.bias) + F.linear(extra_input, self.nonlocal_weight)


def extend_input(layer: nn.Module, extra_in_channels: int, spatial_size: int = 1) -> nn.Module:
    """A copy of ``layer`` (Detectron2 ``Conv2d`` or ``nn.Linear``) that also reads appended channels.

    The returned layer shares ``layer``'s parameters (and norm / activation), so its initialisation is
    kept. For a linear layer after a flatten of (C, H, W), the appended channels are
    ``extra_in_channels * spatial_size`` features (``spatial_size`` = H * W).
    """
    if isinstance(layer, Conv2d):
        extended = ExtendedInputConv2d(
            layer.in_channels, layer.out_channels, kernel_size=layer.kernel_size, stride=layer.stride,
            padding=layer.padding, dilation=layer.dilation, bias=layer.bias is not None, norm=layer.norm,
            activation=layer.activation, extra_in_channels=extra_in_channels,
        )
    elif isinstance(layer, nn.Linear):
        extended = ExtendedInputLinear(
            layer.in_features, layer.out_features, extra_in_features=extra_in_channels * spatial_size,
            bias=layer.bias is not None,
        )
    else:
        raise TypeError(f"Cannot feed NL-RoI channels into a {type(layer).__name__}: need a Conv2d or Linear.")
    extended.weight = layer.weight
    extended.bias = layer.bias
    return extended.to(layer.weight.device)
