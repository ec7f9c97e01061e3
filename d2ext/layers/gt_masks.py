import torch
import torch.nn.functional as F
from detectron2.structures import BitMasks, PolygonMasks
from detectron2.structures.masks import polygons_to_bitmask


def padded_bitmasks(gt_masks, padded_size, device=None):
    """Ground-truth instance masks as one boolean tensor on the padded batch image.

    Works for both ``INPUT.MASK_FORMAT`` values (polygon and bitmask); an instance without any polygon
    (degenerate annotation) gets an empty mask.

    Args:
        gt_masks: ``PolygonMasks``, ``BitMasks`` or an (N, h, w) tensor: one image's
            ``Instances.gt_masks`` at the image's input size (h, w).
        padded_size: (H, W) of the padded batch tensor (``ImageList.tensor``), H >= h, W >= w.
    Returns:
        (N, H, W) bool tensor on ``device``, zero in the padding.
    """
    height, width = (int(s) for s in padded_size)
    if isinstance(gt_masks, PolygonMasks):
        # Polygons are in input-image pixels: rasterising at the padded size leaves the padding empty.
        masks = torch.zeros((len(gt_masks), height, width), dtype=torch.bool)
        for i, polygons in enumerate(gt_masks.polygons):
            if len(polygons) > 0:
                masks[i] = torch.from_numpy(polygons_to_bitmask(polygons, height, width))
        return masks.to(device)
    if isinstance(gt_masks, BitMasks):
        masks = gt_masks.tensor
    elif isinstance(gt_masks, torch.Tensor) and gt_masks.dim() == 3:
        masks = gt_masks
    else:
        raise TypeError(f"padded_bitmasks: expected PolygonMasks, BitMasks or an (N, H, W) tensor, "
                        f"got {type(gt_masks).__name__}")
    mask_h, mask_w = masks.shape[-2:]
    if mask_h > height or mask_w > width:
        raise ValueError(f"padded_bitmasks: masks of size {(mask_h, mask_w)} exceed the padded size {(height, width)}")
    return F.pad(masks.bool(), (0, width - mask_w, 0, height - mask_h)).to(device)
