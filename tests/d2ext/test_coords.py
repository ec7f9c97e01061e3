"""``d2ext.layers.coordinate_features``, the CoordConv channels of SOLO / SOLOv2: x then y, each from -1 at the
first pixel to 1 at the last, as mmdetection's and AdelaiDet's ``torch.linspace(-1, 1, n)`` channels, against
a loop."""
import pytest

from d2ext.layers import coordinate_features


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
