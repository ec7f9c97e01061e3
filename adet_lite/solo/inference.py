"""SOLO's per-image inference on the grid: candidates, mask thresholds, maskness, duplicate removal."""
from dataclasses import dataclass

import torch

from d2ext.layers import stable_argsort

from .nms import mask_nms, matrix_nms

NMS_TYPES = ("matrix", "mask")


@dataclass
class GridInferenceParams:
    score_threshold: float  # category score, strict
    mask_threshold: float  # mask probability, strict
    nms_pre: int  # candidates kept for NMS
    nms_type: str  # "matrix" or "mask"
    nms_kernel: str  # Matrix NMS: "gaussian" or "linear"
    nms_sigma: float
    mask_nms_threshold: float  # greedy mask NMS IoU
    update_threshold: float  # minimum score after Matrix NMS
    max_per_image: int


def select_instances(category_scores, level_min_areas, cell_mask_probs, params):
    """Instances of one image from its (point-NMS'ed) category grids.

    Args:
        category_scores: per level (C, S_l, S_l) probabilities.
        level_min_areas: per level, the pixels (at mask resolution) a binary mask must exceed.
        cell_mask_probs: ``f(levels (K,), cells (K,)) -> (K, h, w)`` mask probabilities of the given
            cells, all at one resolution; called on the candidate cells, then again on the kept ones.
            Only those cells' masks are ever formed.
        params: ``GridInferenceParams``.
    Returns:
        (soft masks (N, h, w), scores (N,), classes (N,)), by decreasing score.
    """
    num_classes = category_scores[0].shape[0]
    device = category_scores[0].device
    flat_scores = torch.cat([s.permute(1, 2, 0).reshape(-1, num_classes) for s in category_scores])
    cell_level = torch.cat([torch.full((s.shape[1] * s.shape[2],), i, dtype=torch.int64, device=device)
                            for i, s in enumerate(category_scores)])
    cell_in_level = torch.cat([torch.arange(s.shape[1] * s.shape[2], device=device) for s in category_scores])
    min_areas = torch.as_tensor(level_min_areas, dtype=torch.float32, device=device)

    cell, classes = torch.nonzero(flat_scores > params.score_threshold, as_tuple=True)
    scores = flat_scores[cell, classes]
    levels, cells = cell_level[cell], cell_in_level[cell]
    masks = cell_mask_probs(levels, cells)
    binary = masks > params.mask_threshold
    areas = binary.flatten(1).sum(dim=1).float()
    # "Maskness": mean probability inside the binary mask, so that unsure masks rank lower. In place:
    # the candidates' soft masks are not needed again (the few kept are formed anew at the end), and
    # each copy of them would cost 134 MB for 500 masks of 200 x 336 (800 x 1333 input). Candidates
    # are only indexed from here on.
    maskness = masks.masked_fill_(~binary, 0.0).flatten(1).sum(dim=1) / areas.clamp(min=1.0)
    del masks
    candidates = torch.nonzero(areas > min_areas[levels]).flatten()
    ranked = stable_argsort(scores[candidates] * maskness[candidates], descending=True)[: params.nms_pre]
    candidates = candidates[ranked]
    scores = scores[candidates] * maskness[candidates]
    if params.nms_type == "matrix":
        scores = matrix_nms(binary[candidates], classes[candidates], scores, kernel=params.nms_kernel,
                            sigma=params.nms_sigma)
        kept = torch.nonzero(scores >= params.update_threshold).flatten()
    elif params.nms_type == "mask":
        kept = mask_nms(binary[candidates], classes[candidates], scores, iou_threshold=params.mask_nms_threshold)
    else:
        raise ValueError(f"NMS_TYPE must be one of {NMS_TYPES}, got {params.nms_type!r}")
    kept = kept[stable_argsort(scores[kept], descending=True)[: params.max_per_image]]
    selected = candidates[kept]
    return cell_mask_probs(levels[selected], cells[selected]), scores[kept], classes[selected]
