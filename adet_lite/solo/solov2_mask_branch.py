"""SOLOv2's mask branch: dynamic 1x1 kernels predicted per cell, applied to unified stride-4 mask features."""
import torch
import torch.nn as nn
import torch.nn.functional as F
from detectron2.layers import Conv2d, get_norm
from detectron2.layers.wrappers import shapes_to_tensor

from d2ext.layers import NUM_QUADRATIC_COORDINATE_TERMS, quadratic_coordinate_logits, resize_soft_masks

from .towers import conv_tower, init_conv, upsample2x, with_coordinates


class KernelBranch(nn.Module):
    """Per level: CoordConv channels appended at the level's resolution, resized to S x S, a conv tower
    and a 3x3 conv predicting ``num_kernels`` values per cell: the E-dimensional kernel (+ 4 coefficients with
    :class:`SOLOv2MaskBranch`'s ``relative_coord_terms``)."""

    def __init__(self, *, in_channels, channels, num_convs, norm, num_grids, num_kernels, use_coordinates):
        super().__init__()
        self.num_grids = list(num_grids)
        self.use_coordinates = use_coordinates
        self.tower = conv_tower(in_channels + (2 if use_coordinates else 0), channels, num_convs, norm)
        self.predictor = init_conv(Conv2d(channels, num_kernels, kernel_size=3, padding=1))

    def forward(self, level_features):
        """per level (B, C, H_l, W_l) -> per level (B, num_kernels, S_l, S_l) kernels."""
        outputs = []
        for x, num_grid in zip(level_features, self.num_grids):
            if self.use_coordinates:
                x = with_coordinates(x)
            x = F.interpolate(x, size=(num_grid, num_grid), mode="bilinear", align_corners=False)
            outputs.append(self.predictor(self.tower(x)))
        return outputs


class MaskFeatureBranch(nn.Module):
    """Unified mask features: FPN level k (k = 0 for the finest) goes through k x (3x3 conv, norm, ReLU,
    x2 upsampling) (one conv without upsampling for k = 0), the deepest level gets CoordConv channels
    first; the sum goes through a 1x1 conv + norm + ReLU to E channels at the finest level's stride."""

    def __init__(self, *, in_channels, channels, out_channels, num_levels, norm, use_coordinates):
        super().__init__()
        self.use_coordinates = use_coordinates
        self.levels = nn.ModuleList()
        for level in range(num_levels):
            convs = []
            for j in range(max(level, 1)):
                first = j == 0
                extra = 2 if (first and use_coordinates and level == num_levels - 1) else 0
                conv = Conv2d((in_channels if first else channels) + extra, channels, kernel_size=3, padding=1,
                              bias=not norm, norm=get_norm(norm, channels), activation=F.relu)
                convs.append(init_conv(conv))
            self.levels.append(nn.Sequential(*convs))
        self.predictor = init_conv(Conv2d(channels, out_channels, kernel_size=1, bias=not norm,
                                          norm=get_norm(norm, out_channels), activation=F.relu))

    def forward(self, features):
        """per level (B, C, H_k, W_k), finest first, H_k = H_0 / 2^k -> (B, E, H_0, W_0)."""
        fused = None
        for level, (x, convs) in enumerate(zip(features, self.levels)):
            if self.use_coordinates and level == len(features) - 1:
                x = with_coordinates(x)
            for conv in convs:
                x = conv(x)
                if level > 0:
                    x = upsample2x(x)
            fused = x if fused is None else fused + x
        return self.predictor(fused)


# Relative coordinate terms (MODEL.SOLOV2.RELATIVE_COORD_TERMS): offsets from the cell's centre in units of
# this many cells (about the size of the objects a level's cells predict).
RELATIVE_COORD_UNIT_CELLS = 4


def relative_coordinate_logits(coefficients, cells, num_grid, height, width):
    """:func:`d2ext.layers.quadratic_coordinate_logits` around each cell's centre, in units of
    ``RELATIVE_COORD_UNIT_CELLS`` cells per axis, on an (height, width) map covering the S x S grid.

    Args:
        coefficients: (K, 4) per cell.
        cells: (K,) cells of the S x S grid (row-major).
    Returns:
        (K, height, width) logits.
    """
    rows = torch.div(cells, num_grid, rounding_mode="floor")
    cols = cells - rows * num_grid
    # float32 whatever the coefficients' dtype (a bfloat16 grid is off by pixels at 300 columns), and from the
    # traced sizes when exported (a constant would hold for the traced image size only).
    cell_size = shapes_to_tensor([width, height], coefficients.device).float() / num_grid
    centres = (torch.stack([cols, rows], dim=1).float() + 0.5) * cell_size
    scales = (RELATIVE_COORD_UNIT_CELLS * cell_size).expand_as(centres)
    return quadratic_coordinate_logits(coefficients, centres, scales, height, width)


class SOLOv2MaskBranch(nn.Module):
    """Mask of cell c of level l of an image: sigmoid(<kernel_l[c], mask features at each pixel>), plus, with
    ``relative_coord_terms``, the cell's :func:`relative_coordinate_logits` inside the sigmoid."""

    def __init__(self, *, kernel_branch, feature_branch, mask_in_features, upsample_factor=1,
                 relative_coord_terms=False):
        """
        Args:
            upsample_factor: masks are predicted at this many times the mask features' resolution
                (their logits upsampled bilinearly); 1 in the reference.
            relative_coord_terms: the kernel branch predicts 4 values per cell beyond the E of its kernel:
                the coefficients of :func:`relative_coordinate_logits` (not in SOLOv2; see
                ``MODEL.SOLOV2.RELATIVE_COORD_TERMS``).
        """
        super().__init__()
        self.kernel_branch = kernel_branch
        self.feature_branch = feature_branch
        self.mask_in_features = list(mask_in_features)
        self.upsample_factor = upsample_factor
        self.relative_coord_terms = relative_coord_terms

    def forward(self, level_features, features):
        """
        Args:
            level_features: per instance level (B, C, H_l, W_l) (resized as in SOLO).
            features: the backbone's dict of FPN maps (``MASK_IN_FEATURES`` are read from it).
        Returns:
            (per level (B, E, S_l, S_l) kernels (E + 4 values with ``relative_coord_terms``), (B, E, H, W) mask
            features at stride 4).
        """
        kernels = self.kernel_branch(level_features)
        mask_features = self.feature_branch([features[name] for name in self.mask_in_features])
        return kernels, mask_features

    def mask_sizes(self, outputs):
        kernels, mask_features = outputs
        return [self._mask_size(mask_features)] * len(kernels)

    def _mask_size(self, mask_features):
        height, width = mask_features.shape[-2:]
        return height * self.upsample_factor, width * self.upsample_factor

    def mask_probs(self, outputs, image, level, cells, size=None):
        """(K,) cells -> (K, f * H, f * W) probabilities (f = ``upsample_factor``): dynamic 1x1 convs on
        the image's (E, H, W) mask features, plus the cells' :func:`relative_coordinate_logits` with
        ``relative_coord_terms``."""
        kernels, mask_features = outputs
        cell_kernels = kernels[level][image].flatten(1)[:, cells].T  # (K, E) (+ 4 coefficients)
        feats = mask_features[image]
        if self.relative_coord_terms:
            num_terms = NUM_QUADRATIC_COORDINATE_TERMS
            cell_kernels, coefficients = cell_kernels[:, :-num_terms], cell_kernels[:, -num_terms:]
        logits = (cell_kernels @ feats.flatten(1)).view(-1, *feats.shape[-2:])
        if self.relative_coord_terms:
            logits = logits + relative_coordinate_logits(coefficients, cells, self.kernel_branch.num_grids[level],
                                                         *feats.shape[-2:])
        logits = resize_soft_masks(logits, self._mask_size(feats))
        return resize_soft_masks(logits.sigmoid(), size)
