"""Mask branches of SOLO (S^2 masks per level) and Decoupled SOLO (S X-masks and S Y-masks per level)."""
import torch.nn as nn
from detectron2.layers import Conv2d

from d2ext.layers import resize_soft_masks

from .towers import conv_tower, init_conv, upsample2x, with_coordinates


class SOLOMaskBranch(nn.Module):
    """CoordConv tower shared by the levels, x2 upsampling, then one 1x1 conv per level predicting a
    mask for each of the S^2 cells (channel i * S + j for row i, column j), at half the level's stride."""

    def __init__(self, *, in_channels, channels, num_convs, norm, num_grids, prior_prob):
        super().__init__()
        self.num_grids = list(num_grids)
        self.tower = conv_tower(in_channels + 2, channels, num_convs, norm)
        self.predictors = nn.ModuleList(
            init_conv(Conv2d(channels, s * s, kernel_size=1), prior_prob) for s in self.num_grids
        )

    def forward(self, level_features, features=None):
        """
        Args:
            level_features: per level (B, C, H_l, W_l). ``features`` (the backbone's dict) is unused.
        Returns:
            per level (B, S_l^2, 2 H_l, 2 W_l) mask logits.
        """
        outputs = []
        for x, predictor in zip(level_features, self.predictors):
            outputs.append(predictor(upsample2x(self.tower(with_coordinates(x)))))
        return outputs

    def mask_sizes(self, outputs):
        return [tuple(o.shape[-2:]) for o in outputs]

    def mask_probs(self, outputs, image, level, cells, size=None):
        """Mask probabilities of some cells of one image and level: (K,) cells -> (K, h, w), at the
        level's resolution or resized to ``size``."""
        return resize_soft_masks(outputs[level][image, cells].sigmoid(), size)


class DecoupledSOLOMaskBranch(nn.Module):
    """Decoupled SOLO: per level S "X" masks and S "Y" masks; the mask of cell (row i, column j) is
    sigmoid(Y_i) * sigmoid(X_j), formed only for the cells that need it (3 S channels instead of S^2).

    The X tower sees the x coordinate channel only and the Y tower the y channel; with ``shared_tower``
    (Decoupled SOLO Light) one tower sees both and feeds both predictors.
    """

    def __init__(self, *, in_channels, channels, num_convs, norm, num_grids, prior_prob, shared_tower):
        super().__init__()
        self.num_grids = list(num_grids)
        self.shared_tower = shared_tower
        if shared_tower:
            self.tower = conv_tower(in_channels + 2, channels, num_convs, norm)
        else:
            self.tower_x = conv_tower(in_channels + 1, channels, num_convs, norm)
            self.tower_y = conv_tower(in_channels + 1, channels, num_convs, norm)
        self.predictors_x = nn.ModuleList(
            init_conv(Conv2d(channels, s, kernel_size=3, padding=1), prior_prob) for s in self.num_grids
        )
        self.predictors_y = nn.ModuleList(
            init_conv(Conv2d(channels, s, kernel_size=3, padding=1), prior_prob) for s in self.num_grids
        )

    def forward(self, level_features, features=None):
        """
        Returns:
            per level a pair (X logits, Y logits), each (B, S_l, 2 H_l, 2 W_l).
        """
        outputs = []
        for level, x in enumerate(level_features):
            if self.shared_tower:
                feat_x = feat_y = upsample2x(self.tower(with_coordinates(x)))
            else:
                feat_x = upsample2x(self.tower_x(with_coordinates(x, which=(0,))))
                feat_y = upsample2x(self.tower_y(with_coordinates(x, which=(1,))))
            outputs.append((self.predictors_x[level](feat_x), self.predictors_y[level](feat_y)))
        return outputs

    def mask_sizes(self, outputs):
        return [tuple(x.shape[-2:]) for x, _ in outputs]

    def mask_probs(self, outputs, image, level, cells, size=None):
        """(K,) cells (i * S + j) -> (K, h, w) probabilities sigmoid(Y_i) * sigmoid(X_j); each factor is
        resized to ``size`` before the product (as the reference)."""
        num_grid = self.num_grids[level]
        logits_x, logits_y = outputs[level]
        rows, cols = cells // num_grid, cells % num_grid
        return (resize_soft_masks(logits_x[image, cols].sigmoid(), size)
                * resize_soft_masks(logits_y[image, rows].sigmoid(), size))
