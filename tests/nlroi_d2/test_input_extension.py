"""The first head layer after the NL-RoI block reads the non-local features untiled: it must equal the
stock layer run on the block's concatenated output, ``cat([x, tile(context)])``, with the stock and
non-local weights side by side."""
import pytest
import torch
import torch.nn.functional as F
from detectron2.layers import Conv2d

from nlroi_d2.input_extension import extend_input


def _tiled(x, context):
    return torch.cat([x, context[:, :, None, None].expand(-1, -1, *x.shape[-2:])], dim=1)


@pytest.mark.parametrize("kernel_size,stride,padding,dilation", [(3, 1, 1, 1), (1, 1, 0, 1), (3, 2, 1, 1),
                                                                 (3, 1, 2, 2), (2, 1, 0, 1), (5, 2, 1, 1)])
def test_conv_equals_conv_of_the_tiled_concatenation(kernel_size, stride, padding, dilation):
    torch.manual_seed(0)
    stock = Conv2d(6, 5, kernel_size=kernel_size, stride=stride, padding=padding, dilation=dilation,
                   activation=F.relu)
    layer = extend_input(stock, extra_in_channels=3)
    with torch.no_grad():
        layer.nonlocal_weight.normal_()
    x, context = torch.randn(4, 6, 7, 9), torch.randn(4, 3)

    weight = torch.cat([stock.weight, layer.nonlocal_weight], dim=1)
    expected = F.relu(F.conv2d(_tiled(x, context), weight, stock.bias, stride, padding, dilation))
    assert torch.allclose(layer(x, context), expected, atol=1e-5)


def test_conv_with_zero_nonlocal_weight_is_the_stock_conv_exactly():
    torch.manual_seed(0)
    stock = Conv2d(6, 5, kernel_size=3, padding=1)
    layer = extend_input(stock, extra_in_channels=3)
    x, context = torch.randn(4, 6, 7, 7), torch.randn(4, 3)
    assert torch.equal(layer(x, context), stock(x))
    assert layer(x[:0], context[:0]).shape == (0, 5, 7, 7)


def test_linear_equals_linear_of_the_flattened_tiled_concatenation():
    torch.manual_seed(0)
    stock = torch.nn.Linear(6 * 4 * 5, 7)
    layer = extend_input(stock, extra_in_channels=3, spatial_size=4 * 5)
    with torch.no_grad():
        layer.nonlocal_weight.normal_()
    x, context = torch.randn(2, 6, 4, 5), torch.randn(2, 3)
    tiled = context[:, :, None, None].expand(-1, -1, 4, 5).flatten(1)
    expected = F.linear(torch.cat([x.flatten(1), tiled], dim=1),
                        torch.cat([stock.weight, layer.nonlocal_weight], dim=1), stock.bias)
    assert torch.allclose(layer(x.flatten(1), context), expected, atol=1e-5)
