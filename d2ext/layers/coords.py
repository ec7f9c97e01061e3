import torch


def coordinate_features(height, width, device=None, dtype=torch.float32):
    """CoordConv channels: (2, H, W) with x then y, each linearly spaced in [-1, 1] across the map."""
    ys = torch.linspace(-1, 1, height, device=device, dtype=dtype)
    xs = torch.linspace(-1, 1, width, device=device, dtype=dtype)
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([grid_x, grid_y], dim=0)
