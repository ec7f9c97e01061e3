"""d2ext.layers.conv3x3_at_cells: a 3x3 conv read at a few cells of multi-level features."""
import pytest
import torch
from detectron2.layers import Conv2d
from torch import nn

from d2ext.layers import conv3x3_at_cells, is_conv3x3


def reference_at_cell(conv, feature, row, col):
    """The conv's output at one cell, summed over its 3x3 window with zero padding."""
    out = []
    for k in range(conv.out_channels):
        total = conv.bias[k].item() if conv.bias is not None else 0.0
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                y, x = row + dy, col + dx
                if 0 <= y < feature.shape[1] and 0 <= x < feature.shape[2]:
                    total += (conv.weight[k, :, dy + 1, dx + 1] * feature[:, y, x]).sum().item()
        out.append(total)
    return out


@pytest.mark.parametrize("bias", [True, False])
def test_equals_the_conv_at_each_cell(bias):
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 5, 3, padding=1, bias=bias)
    features = [torch.randn(2, 3, 6, 7), torch.randn(2, 3, 3, 4)]
    cells = [(0, 0, 0, 0), (1, 0, 5, 6), (0, 1, 2, 3), (1, 1, 1, 0), (1, 0, 2, 2)]  # image, level, row, col
    image_inds, levels, rows, cols = torch.tensor(cells).unbind(dim=1)
    with torch.no_grad():
        got = conv3x3_at_cells(conv, features, image_inds, levels, rows, cols)
    for i, (image, level, row, col) in enumerate(cells):
        assert got[i].tolist() == pytest.approx(reference_at_cell(conv, features[level][image], row, col), abs=1e-5)
    empty = torch.zeros(0, dtype=torch.long)
    assert conv3x3_at_cells(conv, features, empty, empty, empty, empty).shape == (0, 5)


def test_is_conv3x3_only_for_what_conv3x3_at_cells_computes():
    assert is_conv3x3(nn.Conv2d(4, 4, 3, padding=1))
    assert is_conv3x3(Conv2d(4, 4, 3, padding=1, bias=False))
    # A norm or an activation inside Detectron2's Conv2d would be left out of the cells' outputs.
    assert not is_conv3x3(Conv2d(4, 4, 3, padding=1, norm=nn.GroupNorm(2, 4)))
    assert not is_conv3x3(Conv2d(4, 4, 3, padding=1, activation=torch.relu))
    assert not is_conv3x3(nn.Conv2d(4, 4, 3, padding=2, dilation=2))
    assert not is_conv3x3(nn.Conv2d(4, 4, 1))
