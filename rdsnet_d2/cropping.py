"""Cropping module: the region of a mask that an instance may claim, an expanded box.

Official convention (kept): per axis, pad = max(p * (hi - lo + 1), 1); the crop spans
``[max(lo - pad, 0), min(hi + pad, size))`` truncated to integers, and pixel (or column) c is inside
iff ``x1 <= c < x2``. Training crops the stride-4 logits with the GT box / 4 and p = 0.25 (pixels
outside are ignored); inference multiplies the soft mask by the crop of the detected box, p = 0.1.
"""
import torch


def expanded_crop_boxes(boxes, expand, height, width):
    """
    Args:
        boxes: (N, 4) XYXY boxes in the mask's pixel frame.
        expand: p, the fraction of the box size added on each side.
        height, width: the mask's size.
    Returns:
        (N, 4) long crop boxes [x1, y1, x2, y2): pixel (y, x) is inside iff x1 <= x < x2, y1 <= y < y2.
    """
    if expand < 0:
        raise ValueError(f"crop expansion must be >= 0, got {expand}")
    boxes = boxes.float()
    low, high = boxes[:, :2], boxes[:, 2:]  # (x1, y1), (x2, y2): both axes in each op
    pad = (expand * (high - low + 1)).clamp(min=1)
    low = (low - pad).clamp(min=0)
    high = high + pad
    crop = torch.stack([low[:, 0], low[:, 1], high[:, 0].clamp(max=width), high[:, 1].clamp(max=height)], dim=1)
    return crop.long()  # the cast truncates toward zero (ONNX has no trunc op)


def crop_axes(crop_boxes, height, width):
    """(N, 4) long crop boxes -> which rows (N, H) and which columns (N, W) bool lie inside each crop: a crop
    mask is their outer product (:func:`crop_masks`), which inference forms a chunk of detections at a time."""
    xs = torch.arange(width, device=crop_boxes.device)
    ys = torch.arange(height, device=crop_boxes.device)
    inside_x = (xs >= crop_boxes[:, 0:1]) & (xs < crop_boxes[:, 2:3])
    inside_y = (ys >= crop_boxes[:, 1:2]) & (ys < crop_boxes[:, 3:4])
    return inside_y, inside_x


def crop_masks(crop_boxes, height, width):
    """(N, 4) long crop boxes -> (N, H, W) bool, True inside the crop."""
    inside_y, inside_x = crop_axes(crop_boxes, height, width)
    return inside_y[:, :, None] & inside_x[:, None, :]
