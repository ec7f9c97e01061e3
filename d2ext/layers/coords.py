import torch


def coordinate_features(height, width, device=None, dtype=torch.float32):
    """CoordConv channels: (2, H, W) with x then y, each linearly spaced in [-1, 1] across the map."""
    ys = torch.linspace(-1, 1, height, device=device, dtype=dtype)
    xs = torch.linspace(-1, 1, width, device=device, dtype=dtype)
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([grid_x, grid_y], dim=0)


# The terms of quadratic_coordinate_logits: x, y, x^2, y^2.
NUM_QUADRATIC_COORDINATE_TERMS = 4


def quadratic_coordinate_logits(coefficients, centres, scales, height, width):
    """Per instance, sum_t c_t * term_t over the terms (x, y, x^2, y^2) of each pixel centre of a (height, width)
    map, in coordinates relative to the instance's centre and divided by its scale. Added to the logits of a
    translation-invariant mask (a linear kernel on shared features), it lets the mask favour the pixels near
    its instance (negative x^2, y^2 coefficients: a bump at the centre), which the kernel alone cannot when a
    neighbour of the same class looks the same (RDSNet's and SOLOv2's optional coordinate terms).

    Args:
        coefficients: (N, ..., 4) per instance (and any further dims, e.g. RDSNet's two slots).
        centres: (N, 2) (x, y) in pixels of the map, whose pixel i has its centre at i + 0.5. The pixel grid
            takes their dtype and device.
        scales: (N, 2) positive (x, y) units of the relative coordinates, in pixels.
    Returns:
        (N, ..., height, width) logits.
    """
    xs = torch.arange(width, device=centres.device, dtype=centres.dtype) + 0.5
    ys = torch.arange(height, device=centres.device, dtype=centres.dtype) + 0.5
    x = ((xs[None] - centres[:, :1]) / scales[:, :1])[..., None, :]  # (N, 1, W)
    y = ((ys[None] - centres[:, 1:]) / scales[:, 1:])[..., :, None]  # (N, H, 1)
    for _ in range(coefficients.dim() - 2):  # the dims between N and the terms
        x, y = x.unsqueeze(1), y.unsqueeze(1)
    c = coefficients[..., None, None].unbind(dim=-3)  # 4 x (N, ..., 1, 1)
    return c[0] * x + c[1] * y + c[2] * x ** 2 + c[3] * y ** 2
