"""BoxInst (Tian et al., CVPR 2021): CondInst trained from boxes only.

The mask targets are the boxes' filled rectangles. Two losses replace the dice loss: the projection
loss (dice between the x / y max-projections of the predicted mask and of the box) and the pairwise loss
(neighbouring pixels of similar colour, inside the box, should get the same label).
"""
import torch
import torch.nn.functional as F
from detectron2.structures import Instances

from d2ext.layers import dice_loss

# sRGB (D65) -> CIE XYZ, and the D65 reference white.
_RGB_TO_XYZ = ((0.412453, 0.357580, 0.180423),
               (0.212671, 0.715160, 0.072169),
               (0.019334, 0.119193, 0.950227))
_D65_WHITE = (0.95047, 1.0, 1.08883)


def rgb_to_lab(images):
    """CIE L*a*b* of sRGB images.

    Args:
        images: (N, 3, H, W) RGB values in [0, 255].
    Returns:
        (N, 3, H, W): L in [0, 100], a and b roughly in [-128, 127].
    """
    rgb = images.float() / 255.0
    linear = torch.where(rgb > 0.04045, ((rgb + 0.055) / 1.055) ** 2.4, rgb / 12.92)
    matrix = torch.tensor(_RGB_TO_XYZ, dtype=linear.dtype, device=linear.device)
    xyz = torch.einsum("ij,njhw->nihw", matrix, linear)
    xyz = xyz / torch.tensor(_D65_WHITE, dtype=xyz.dtype, device=xyz.device)[None, :, None, None]
    f = torch.where(xyz > 0.008856, xyz.clamp(min=1e-12) ** (1.0 / 3.0), 7.787 * xyz + 16.0 / 116.0)
    fx, fy, fz = f.unbind(dim=1)
    return torch.stack((116.0 * fy - 16.0, 500.0 * (fx - fy), 200.0 * (fy - fz)), dim=1)


def unfold_without_center(x, kernel_size, dilation):
    """The (kernel_size^2 - 1) dilated neighbours of every pixel (zero outside the map).

    Args:
        x: (N, C, H, W).
    Returns:
        (N, C, kernel_size^2 - 1, H, W); neighbour k is the k-th of the kernel's window in row-major
        order, the centre left out.
    """
    num, channels, height, width = x.shape
    padding = dilation * (kernel_size - 1) // 2
    unfolded = F.unfold(x, kernel_size=kernel_size, dilation=dilation, padding=padding)
    unfolded = unfolded.reshape(num, channels, kernel_size * kernel_size, height, width)
    center = kernel_size * kernel_size // 2
    return torch.cat((unfolded[:, :, :center], unfolded[:, :, center + 1:]), dim=2)


def color_similarity(image_lab, image_mask, kernel_size, dilation):
    """exp(-||lab(pixel) - lab(neighbour)|| / 2) for every pixel and neighbour, zero where the
    neighbour is outside the valid image (``image_mask``: (H, W), 1 inside).

    Args:
        image_lab: (3, H, W).
    Returns:
        (kernel_size^2 - 1, H, W).
    """
    neighbours = unfold_without_center(image_lab[None], kernel_size, dilation)[0]  # (3, K, H, W)
    similarity = torch.exp(-torch.norm(image_lab[:, None] - neighbours, dim=0) * 0.5)
    valid = unfold_without_center(image_mask[None, None].float(), kernel_size, dilation)[0, 0]
    return similarity * valid


def add_box_bitmask_targets(instances: Instances, padded_height, padded_width, mask_out_stride):
    """Attach box masks as ``gt_bitmasks_full`` (M, H, W) (the pixels from floor(x0), floor(y0) to
    x1, y1 inclusive) and ``gt_bitmasks`` (M, H/s, W/s) sampled at pixels ``s * i + s // 2``."""
    boxes = instances.gt_boxes.tensor
    ys = torch.arange(padded_height, device=boxes.device, dtype=boxes.dtype)
    xs = torch.arange(padded_width, device=boxes.device, dtype=boxes.dtype)
    x0, y0 = boxes[:, 0].floor(), boxes[:, 1].floor()
    x1, y1 = boxes[:, 2].floor(), boxes[:, 3].floor()
    inside_y = (ys[None] >= y0[:, None]) & (ys[None] <= y1[:, None])
    inside_x = (xs[None] >= x0[:, None]) & (xs[None] <= x1[:, None])
    full = (inside_y[:, :, None] & inside_x[:, None, :]).float()
    start = mask_out_stride // 2
    instances.gt_bitmasks_full = full
    instances.gt_bitmasks = full[:, start::mask_out_stride, start::mask_out_stride]
    return instances


def projection_loss(mask_probs, box_masks):
    """Mean over instances of the dice losses of the max-projections on the x and on the y axis.

    Args:
        mask_probs, box_masks: (N, 1, H, W).
    """
    loss_x = dice_loss(mask_probs.max(dim=2).values, box_masks.max(dim=2).values)
    loss_y = dice_loss(mask_probs.max(dim=3).values, box_masks.max(dim=3).values)
    return (loss_x + loss_y).mean()


def pairwise_disagreement(mask_logits, kernel_size, dilation):
    """-log P(pixel and neighbour get the same label) = -log(p p' + (1 - p)(1 - p')), computed in log space.

    Args:
        mask_logits: (N, 1, H, W).
    Returns:
        (N, kernel_size^2 - 1, H, W).
    """
    log_fg = F.logsigmoid(mask_logits)
    log_bg = F.logsigmoid(-mask_logits)
    log_same_fg = log_fg + unfold_without_center(log_fg, kernel_size, dilation)[:, 0]
    log_same_bg = log_bg + unfold_without_center(log_bg, kernel_size, dilation)[:, 0]
    return -torch.logaddexp(log_same_fg, log_same_bg)


def boxinst_losses(mask_logits, box_masks, similarity, *, kernel_size, dilation, color_thresh, warmup_factor):
    """
    Args:
        mask_logits: (N, 1, H, W) dynamic-head outputs at the mask stride.
        box_masks: (N, 1, H, W) box masks of the instances' objects at the same stride.
        similarity: (N, K, H, W) colour similarity of each pixel to its K neighbours (their images').
        warmup_factor: multiplier of the pairwise loss (ramps from 0 to 1 during warm-up).
    Returns:
        {"loss_prj": ..., "loss_pairwise": ...}
    """
    loss_prj = projection_loss(mask_logits.sigmoid(), box_masks)
    # Only pairs of similar colour whose centre pixel lies in the box constrain the mask.
    weights = (similarity >= color_thresh).float() * box_masks
    disagreement = pairwise_disagreement(mask_logits, kernel_size, dilation)
    loss_pairwise = (disagreement * weights).sum() / weights.sum().clamp(min=1.0)
    return {"loss_prj": loss_prj, "loss_pairwise": loss_pairwise * warmup_factor}
