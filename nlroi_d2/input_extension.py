"""The first layer after an NL-RoI block: a stock conv / fc layer that also reads the Dg appended channels.

Its weight is stored in two parameters: the stock ``weight`` (shape of the plain model's layer, so a
Detectron2 model-zoo checkpoint loads into it unchanged) and ``nonlocal_weight`` for the appended
channels, initialised to zero. A plain checkpoint therefore reproduces the plain model exactly: the
layer computes ``stock(x) + 0``. Only ``nonlocal_weight`` is reported missing when loading one.

The appended channels hold each RoI's non-local feature tiled over H x W (``NLRoIBlock.forward``), so
the layers take that feature untiled, ``context`` (N, Dg), next to the stock input: the response of a
constant map is a linear function of it per output position, computed here without the tiled copy of
the features and the extra Dg-channel convolution.
"""
import torch
from torch import nn
from torch.nn import functional as F

from detectron2.layers import Conv2d


class ExtendedInputConv2d(Conv2d):
    """Detectron2 ``Conv2d`` (with its norm and activation) over ``cat([x, tile(context)], dim=1)``.

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

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """x: (N, C_in, H, W) stock input; context: (N, C_extra), the appended channels' value at every
        position -> (N, C_out, H', W')."""
        input_size = x.shape[-2:]
        x = F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation)
        x = x + self.context_response(context, input_size)
        if self.norm is not None:
            x = self.norm(x)
        if self.activation is not None:
            x = self.activation(x)
        return x

    def context_response(self, context: torch.Tensor, input_size) -> torch.Tensor:
        """``conv2d(tile(context), nonlocal_weight)`` without the tiling: at each output position, the
        sum of the kernel taps that fall inside the (zero-padded) input, applied to ``context``.

        Args:
            context: (N, C_extra); input_size: (H, W) of the map it is tiled over.
        Returns:
            (N, C_out, H', W').
        """
        num_taps = self.kernel_size[0] * self.kernel_size[1]
        one_hot_taps = torch.eye(num_taps, dtype=context.dtype, device=context.device).view(num_taps, 1, *self.kernel_size)
        # (taps, H', W'): 1 where the tap reads the input, 0 where it reads padding.
        taps_inside = F.conv2d(context.new_ones(1, 1, *input_size), one_hot_taps, None, self.stride, self.padding,
                               self.dilation)[0]
        weight = self.nonlocal_weight.to(context.dtype).flatten(2)  # (C_out, C_extra, taps)
        per_position = torch.einsum("oct,tp->cop", weight, taps_inside.flatten(1))  # (C_extra, C_out, H'*W')
        return (context @ per_position.flatten(1)).view(context.shape[0], self.out_channels, *taps_inside.shape[-2:])


class ExtendedInputLinear(nn.Linear):
    """``nn.Linear`` over ``cat([x, flatten(tile(context))], dim=1)``: ``weight`` (out, in) stock,
    ``nonlocal_weight`` (out, C_extra * H * W), the features of a flattened (C_extra, H, W) map."""

    def __init__(self, in_features: int, out_features: int, *, extra_in_channels: int, spatial_size: int,
                 bias: bool = True):
        super().__init__(in_features, out_features, bias=bias)
        self.extra_in_channels = extra_in_channels
        self.spatial_size = spatial_size
        self.nonlocal_weight = nn.Parameter(torch.zeros(out_features, extra_in_channels * spatial_size))

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """x: (N, in); context: (N, C_extra), constant over the H x W positions -> (N, out)."""
        per_channel = self.nonlocal_weight.view(self.out_features, self.extra_in_channels, self.spatial_size).sum(2)
        return F.linear(x, self.weight, self.bias) + F.linear(context, per_channel)


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
            layer.in_features, layer.out_features, extra_in_channels=extra_in_channels,
            spatial_size=spatial_size, bias=layer.bias is not None,
        )
    else:
        raise TypeError(f"Cannot feed NL-RoI channels into a {type(layer).__name__}: need a Conv2d or Linear.")
    extended.weight = layer.weight
    extended.bias = layer.bias
    return extended.to(layer.weight.device)
