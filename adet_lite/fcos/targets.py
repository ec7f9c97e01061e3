"""FCOS training targets: which object (if any) each location regresses, and its distances."""
import math
from typing import List

import torch
from detectron2.structures import Instances

from d2ext.layers import mask_centroids

INF = math.inf


def compute_locations(height, width, stride, device):
    """Image coordinates of the locations of a (height, width) feature map of ``stride``.

    Returns:
        (height * width, 2) float tensor of (x, y) = (j * stride + stride // 2, i * stride + stride // 2),
        row-major (the order of ``feature.flatten(2)``).
    """
    xs = torch.arange(0, width * stride, step=stride, dtype=torch.float32, device=device)
    ys = torch.arange(0, height * stride, step=stride, dtype=torch.float32, device=device)
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack((grid_x.reshape(-1), grid_y.reshape(-1)), dim=1) + stride // 2


def level_size_ranges(sizes_of_interest: List[int], num_levels: int):
    """[low, high] max-regression-distance range of each level: (-1, s0], [s0, s1], ..., [s_last, inf]."""
    if len(sizes_of_interest) != num_levels - 1:
        raise ValueError(
            f"MODEL.FCOS.SIZES_OF_INTEREST has {len(sizes_of_interest)} values; {num_levels} levels need "
            f"{num_levels - 1}")
    bounds = [-1.0, *[float(s) for s in sizes_of_interest], INF]
    return [(bounds[i], bounds[i + 1]) for i in range(num_levels)]


def object_centers(instances: Instances):
    """(M, 2) centres used for centre sampling: the mask centroid when the instances carry full-image
    bitmasks (``gt_bitmasks_full``, (M, H, W)), else the box centre. Empty masks use the box centre."""
    box_centers = instances.gt_boxes.get_centers()
    if not instances.has("gt_bitmasks_full") or len(instances) == 0:
        return box_centers
    centroids, area = mask_centroids(instances.gt_bitmasks_full)
    return torch.where((area > 0)[:, None], centroids, box_centers)


def center_sampling_region(boxes, centers, location_strides, radius):
    """Boxes of side ``2 * radius * stride`` around each object's centre, clipped to the object's box.

    Args:
        boxes: (M, 4) XYXY object boxes.
        centers: (M, 2) object centres.
        location_strides: (L,) stride of each location's level.
    Returns:
        (L, M, 4) XYXY regions.
    """
    half = location_strides[:, None] * radius  # (L, 1)
    x0 = torch.maximum(centers[None, :, 0] - half, boxes[None, :, 0])
    y0 = torch.maximum(centers[None, :, 1] - half, boxes[None, :, 1])
    x1 = torch.minimum(centers[None, :, 0] + half, boxes[None, :, 2])
    y1 = torch.minimum(centers[None, :, 1] + half, boxes[None, :, 3])
    return torch.stack((x0, y0, x1, y1), dim=2)


def distances_to_boxes(locations, boxes):
    """(l, t, r, b) distances from each location to each box.

    Args:
        locations: (L, 2) (x, y).
        boxes: (M, 4) XYXY boxes, or (L, M, 4) boxes per location.
    Returns:
        (L, M, 4).
    """
    xs, ys = locations[:, 0, None], locations[:, 1, None]
    return torch.stack((xs - boxes[..., 0], ys - boxes[..., 1], boxes[..., 2] - xs, boxes[..., 3] - ys), dim=2)


@torch.no_grad()
def fcos_targets_single_image(locations, location_strides, size_ranges, instances: Instances, num_classes,
                              center_sample=True, radius=1.5):
    """Assign each location of one image to an object (or to the background).

    A location is positive for an object when it lies inside the object's box (within the centre
    sampling region with ``center_sample``) and the object's largest distance from it falls in the
    location's level range; among several such objects the one of minimum box area wins.

    Args:
        locations: (L, 2) (x, y) of the locations of all levels.
        location_strides: (L,) stride of each location's level.
        size_ranges: (L, 2) [low, high] of each location's level (inclusive).
        instances: the image's ground truth, with ``gt_boxes`` and ``gt_classes`` (M objects) and
            optionally ``gt_bitmasks_full`` (centre sampling then uses mask centroids).
    Returns:
        labels: (L,) int64 class per location, ``num_classes`` for background.
        reg_targets: (L, 4) (l, t, r, b) distances in pixels to the assigned object (0 for background).
        matched_inds: (L,) int64 index of the assigned object in ``instances``, -1 for background.
    """
    num_locations = locations.shape[0]
    if len(instances) == 0:
        return (torch.full((num_locations,), num_classes, dtype=torch.int64, device=locations.device),
                locations.new_zeros((num_locations, 4)),
                torch.full((num_locations,), -1, dtype=torch.int64, device=locations.device))
    boxes = instances.gt_boxes.tensor
    distances = distances_to_boxes(locations, boxes)  # (L, M, 4)
    if center_sample:
        regions = center_sampling_region(boxes, object_centers(instances), location_strides, radius)
        inside = distances_to_boxes(locations, regions).min(dim=2).values > 0
    else:
        inside = distances.min(dim=2).values > 0
    max_distance = distances.max(dim=2).values
    in_level_range = (max_distance >= size_ranges[:, None, 0]) & (max_distance <= size_ranges[:, None, 1])

    areas = instances.gt_boxes.area()[None].expand(num_locations, -1).clone()
    areas[~(inside & in_level_range)] = INF
    min_area, matched_inds = areas.min(dim=1)
    background = min_area == INF

    labels = instances.gt_classes[matched_inds].clone()
    labels[background] = num_classes
    reg_targets = distances[torch.arange(num_locations, device=locations.device), matched_inds]
    reg_targets[background] = 0.0
    matched_inds = matched_inds.masked_fill(background, -1)
    return labels, reg_targets, matched_inds


def centerness_targets(reg_targets):
    """sqrt(min(l, r) / max(l, r) * min(t, b) / max(t, b)) for (P, 4) positive (l, t, r, b) targets."""
    left_right = reg_targets[:, [0, 2]]
    top_bottom = reg_targets[:, [1, 3]]
    ratio = (left_right.min(dim=1).values / left_right.max(dim=1).values) * \
            (top_bottom.min(dim=1).values / top_bottom.max(dim=1).values)
    return torch.sqrt(ratio)
