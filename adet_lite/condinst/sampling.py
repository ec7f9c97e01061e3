import torch
from detectron2.structures import Instances


def sample_positives(positives: Instances, max_proposals=-1, topk_per_image=-1):
    """Choose the FCOS positives whose masks are trained (bounds the dynamic head's cost).

    Args:
        positives: positives of the batch with ``im_inds``, ``gt_inds``, ``logits_pred`` (P, C) and
            ``ctrness_pred`` (P,).
        max_proposals: if >= 0, at most this many positives of the batch, drawn at random.
        topk_per_image: else, if >= 0, per image at most ``max(topk_per_image // objects, 1)``
            positives per object (objects = those with positives), the ones of highest
            ``max sigmoid(cls) * sigmoid(ctr)``.
    Returns:
        the chosen subset of ``positives``.
    """
    if max_proposals >= 0:
        if len(positives) > max_proposals:
            keep = torch.randperm(len(positives), device=positives.im_inds.device)[:max_proposals]
            return positives[keep]
        return positives
    if topk_per_image < 0:
        return positives
    scores = positives.logits_pred.sigmoid().max(dim=1).values * positives.ctrness_pred.sigmoid()
    keep = []
    for image in positives.im_inds.unique():
        in_image = torch.nonzero(positives.im_inds == image).squeeze(1)
        objects = positives.gt_inds[in_image].unique()
        per_object = max(topk_per_image // len(objects), 1)
        for obj in objects:
            candidates = in_image[positives.gt_inds[in_image] == obj]
            if len(candidates) > per_object:
                candidates = candidates[scores[candidates].topk(per_object).indices]
            keep.append(candidates)
    if not keep:
        return positives
    return positives[torch.cat(keep)]
