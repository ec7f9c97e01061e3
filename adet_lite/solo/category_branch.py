import torch.nn as nn
import torch.nn.functional as F
from detectron2.layers import Conv2d

from .towers import conv_tower, init_conv


class CategoryBranch(nn.Module):
    """SOLO's semantic category branch: each level resized to its S x S grid *before* the first conv,
    then a conv tower and a 3x3 classifier; shared across levels."""

    def __init__(self, *, in_channels, channels, num_convs, norm, num_classes, num_grids, prior_prob):
        super().__init__()
        self.num_grids = list(num_grids)
        self.tower = conv_tower(in_channels, channels, num_convs, norm)
        self.predictor = init_conv(Conv2d(channels, num_classes, kernel_size=3, padding=1), prior_prob)

    def forward(self, features):
        """
        Args:
            features: per level (B, C, H_l, W_l).
        Returns:
            per level (B, num_classes, S_l, S_l) logits.
        """
        outputs = []
        for x, num_grid in zip(features, self.num_grids):
            x = F.interpolate(x, size=(num_grid, num_grid), mode="bilinear", align_corners=False)
            outputs.append(self.predictor(self.tower(x)))
        return outputs
