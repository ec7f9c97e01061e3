"""SOLO's grid target assignment: which cells of which level predict which ground-truth instance."""
from dataclasses import dataclass
from typing import List, Sequence, Tuple

import torch
import torch.nn.functional as F

from d2ext.layers import mask_centroids


@dataclass
class GridTargets:
    """Targets of one image on one level of S x S cells (cells numbered row-major: cell = i * S + j).

    labels: (S*S,) int64 class of each cell; ``num_classes`` means background.
    cells: (P,) positive cells. gt_indices: (P,) the instance each positive cell predicts.
    masks: (P, h, w) float mask targets at the level's mask resolution: 0/1, or coverage fractions.
    """

    labels: torch.Tensor
    cells: torch.Tensor
    gt_indices: torch.Tensor
    masks: torch.Tensor


def _grid_index(coordinate, extent, num_grid):
    """Cell index of an image coordinate along one axis: trunc(coordinate / extent * S), as the reference."""
    return torch.div(coordinate / extent, 1.0 / num_grid, rounding_mode="trunc").long()


def rescale_masks(masks, stride, size, coverage=False):
    """Downsample (N, H, W) binary masks of the padded image by ``stride`` and paste them at the top-left of
    a ``size`` = (h, w) canvas: bilinear, >= 0.5 (the reference), or with ``coverage`` the fraction of each
    target pixel the mask covers (area interpolation), whose 0.5 level is the mask's boundary where
    binarising moves it by up to half a target pixel. Returns (N, h, w) float."""
    num, height, width = masks.shape
    scaled_size = (int(height / stride + 0.5), int(width / stride + 0.5))
    canvas = masks.new_zeros((num, *size), dtype=torch.float32)
    if num == 0:
        return canvas
    if coverage:
        scaled = F.interpolate(masks[:, None].float(), size=scaled_size, mode="area")[:, 0]
    else:
        scaled = F.interpolate(masks[:, None].float(), size=scaled_size, mode="bilinear", align_corners=False)[:, 0]
        scaled = (scaled >= 0.5).float()
    h, w = min(size[0], scaled_size[0]), min(size[1], scaled_size[1])
    canvas[:, :h, :w] = scaled[:, :h, :w]
    return canvas


def assign_grid_targets(
    gt_masks: torch.Tensor,
    gt_boxes: torch.Tensor,
    gt_classes: torch.Tensor,
    *,
    num_classes: int,
    num_grids: Sequence[int],
    scale_ranges: Sequence[Tuple[float, float]],
    sigma: float,
    mask_sizes: Sequence[Tuple[int, int]],
    mask_strides: Sequence[float],
    deduplicate_cells: bool,
    coverage_mask_targets: bool = False,
) -> List[GridTargets]:
    """Targets of one image on every level.

    An instance trains every level whose (inclusive) scale range contains sqrt(box area). Its positive
    cells are those whose centre region (the box scaled by ``sigma`` around the mask's centre of mass)
    covers, limited to the 3 x 3 cells around the centre-of-mass cell. Where instances compete for a
    cell, the later instance wins the cell's class; with ``deduplicate_cells`` (SOLO) also its mask,
    otherwise (SOLOv2) every (instance, cell) pair is a positive of its own.

    Args:
        gt_masks: (N, H, W) binary masks on the padded input image.
        gt_boxes: (N, 4) boxes (x1, y1, x2, y2) in input pixels.
        gt_classes: (N,) classes in [0, num_classes).
        mask_sizes: (h, w) of each level's predicted masks; mask_strides: their stride on the input.
        coverage_mask_targets: mask targets as coverage fractions instead of 0/1 (see :func:`rescale_masks`).
    Returns:
        one ``GridTargets`` per level.
    """
    device = gt_masks.device
    height, width = gt_masks.shape[-2:]
    widths = gt_boxes[:, 2] - gt_boxes[:, 0]
    heights = gt_boxes[:, 3] - gt_boxes[:, 1]
    scales = torch.sqrt(widths.clamp(min=0) * heights.clamp(min=0))
    # An instance whose mask vanished (degenerate polygon, cropped away) has no centre: it trains nothing.
    nonempty = gt_masks.flatten(1).any(dim=1)
    centre_col, centre_row = mask_centroids(gt_masks)[0].unbind(dim=1)
    half_h = 0.5 * heights * sigma
    half_w = 0.5 * widths * sigma
    offsets = torch.tensor([-1, 0, 1], device=device)

    targets = []
    for num_grid, (low, high), mask_size, mask_stride in zip(num_grids, scale_ranges, mask_sizes, mask_strides):
        labels = torch.full((num_grid * num_grid,), num_classes, dtype=torch.int64, device=device)
        hit = torch.nonzero(nonempty & (scales >= low) & (scales <= high)).flatten()
        if hit.numel() == 0:
            empty = torch.zeros(0, dtype=torch.int64, device=device)
            targets.append(GridTargets(labels, empty, empty, gt_masks.new_zeros((0, *mask_size), dtype=torch.float32)))
            continue
        row = _grid_index(centre_row[hit], height, num_grid)
        col = _grid_index(centre_col[hit], width, num_grid)
        top = torch.maximum(_grid_index(centre_row[hit] - half_h[hit], height, num_grid).clamp(min=0), row - 1)
        bottom = torch.minimum(_grid_index(centre_row[hit] + half_h[hit], height, num_grid).clamp(max=num_grid - 1), row + 1)
        left = torch.maximum(_grid_index(centre_col[hit] - half_w[hit], width, num_grid).clamp(min=0), col - 1)
        right = torch.minimum(_grid_index(centre_col[hit] + half_w[hit], width, num_grid).clamp(max=num_grid - 1), col + 1)

        # The 3 x 3 cells around each centre cell, (n, 3, 3), kept where inside the instance's region.
        rows = row[:, None, None] + offsets[None, :, None]
        cols = col[:, None, None] + offsets[None, None, :]
        inside = ((rows >= top[:, None, None]) & (rows <= bottom[:, None, None])
                  & (cols >= left[:, None, None]) & (cols <= right[:, None, None]))
        pair_cells = (rows * num_grid + cols)[inside]  # instance-major, then row-major
        pair_gts = hit[:, None, None].expand(inside.shape)[inside]

        # "Later instance wins": the largest instance index that covers a cell.
        winner = torch.full_like(labels, -1).scatter_reduce(0, pair_cells, pair_gts, reduce="amax")
        covered = winner >= 0
        labels[covered] = gt_classes[winner[covered]]
        if deduplicate_cells:
            cells = torch.nonzero(covered).flatten()
            gt_indices = winner[cells]
        else:
            cells, gt_indices = pair_cells, pair_gts

        level_masks = rescale_masks(gt_masks[hit], mask_stride, mask_size, coverage=coverage_mask_targets)
        # Position of each instance within ``hit`` (hit is sorted, so searchsorted finds it).
        masks = level_masks[torch.searchsorted(hit, gt_indices)]
        targets.append(GridTargets(labels, cells, gt_indices, masks))
    return targets
