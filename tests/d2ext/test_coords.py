"""``d2ext.layers`` coordinates against loops: ``coordinate_features``, the CoordConv channels of SOLO / SOLOv2
(x then y, each from -1 at the first pixel to 1 at the last, as mmdetection's and AdelaiDet's
``torch.linspace(-1, 1, n)`` channels), and ``quadratic_coordinate_logits`` (RDSNet's and SOLOv2's optional
coordinate terms)."""
import pytest
import torch

from d2ext.layers import coordinate_features, quadratic_coordinate_logits


def _linspace_value(index, count):
    return -1.0 if count == 1 else -1.0 + 2.0 * index / (count - 1)


@pytest.mark.parametrize("height, width", [(3, 5), (4, 1), (1, 6)])
def test_coordinate_features_are_x_then_y_from_minus_one_to_one(height, width):
    coords = coordinate_features(height, width)
    assert coords.shape == (2, height, width)
    for i in range(height):
        for j in range(width):
            assert coords[0, i, j].item() == pytest.approx(_linspace_value(j, width))
            assert coords[1, i, j].item() == pytest.approx(_linspace_value(i, height))


@pytest.mark.parametrize("slots", [None, 2])
def test_quadratic_coordinate_logits_match_loop(slots):
    """Per instance (and slot), c0 x + c1 y + c2 x^2 + c3 y^2 with (x, y) = (pixel centre - centre) / scale."""
    torch.manual_seed(0)
    centres = torch.tensor([[2.0, 3.5], [0.0, 7.0], [4.25, 1.0]])
    scales = torch.tensor([[1.0, 2.0], [3.0, 0.5], [1.5, 1.5]])
    coefficients = torch.randn(3, 4) if slots is None else torch.randn(3, slots, 4)
    logits = quadratic_coordinate_logits(coefficients, centres, scales, 6, 5)
    assert logits.shape == (*coefficients.shape[:-1], 6, 5)
    for n in range(3):
        for slot in [None] if slots is None else range(slots):
            c = coefficients[n] if slot is None else coefficients[n, slot]
            for i in range(6):
                for j in range(5):
                    x = (j + 0.5 - centres[n, 0].item()) / scales[n, 0].item()
                    y = (i + 0.5 - centres[n, 1].item()) / scales[n, 1].item()
                    expected = (c[0] * x + c[1] * y + c[2] * x * x + c[3] * y * y).item()
                    got = logits[n, i, j] if slot is None else logits[n, slot, i, j]
                    assert got.item() == pytest.approx(expected, rel=1e-5, abs=1e-5)
    empty = quadratic_coordinate_logits(coefficients[:0], centres[:0], scales[:0], 6, 5)
    assert empty.shape == (0, *coefficients.shape[1:-1], 6, 5)
