"""MBRM as a post-processor for any detector that predicts boxes and soft instance masks, and the
Mask R-CNN meta-architecture that uses it (``MODEL.META_ARCHITECTURE "GeneralizedRCNNWithMBRM"``,
switched on by ``MODEL.MBRM.ENABLED``)."""
from typing import Dict, List, Optional

import torch
from detectron2.config import configurable
from detectron2.layers import paste_masks_in_image
from detectron2.modeling import META_ARCH_REGISTRY, GeneralizedRCNN
from detectron2.modeling.postprocessing import detector_postprocess
from detectron2.structures import Boxes, Instances

from d2ext.layers import postprocess_per_image, register_empty_load_check

from .mbrm import MBRM, cat_profiles


def refine_instances_with_mbrm(mbrm, instances, soft_masks):
    """Refine the boxes of one image's detections with their soft masks; masks are not changed.

    Args:
        mbrm: an :class:`MBRM`.
        instances: ``Instances`` of image size (H, W) with ``pred_boxes`` (N boxes in that frame).
        soft_masks: (N, H, W) foreground probabilities in [0, 1] of the same detections, or an
            iterable of (n_i, H, W) chunks of them in detection order (sum n_i = N), so that a caller
            can produce full-image masks chunk by chunk instead of all N at once.
    Returns:
        new ``Instances`` with the same fields (shared, not copied) and the refined ``pred_boxes``.
    """
    boxes = instances.pred_boxes.tensor
    chunks = [soft_masks] if isinstance(soft_masks, torch.Tensor) else soft_masks
    profile_chunks = []
    for chunk in chunks:
        if tuple(chunk.shape[-2:]) != tuple(instances.image_size):
            raise ValueError(f"refine_instances_with_mbrm: soft masks of size {tuple(chunk.shape[-2:])} "
                             f"for instances of image size {tuple(instances.image_size)}")
        profile_chunks.append(MBRM.profiles(chunk))
    x_profiles, y_profiles = cat_profiles(profile_chunks, instances.image_size, boxes.device)
    refined = Instances(instances.image_size, **instances.get_fields())
    refined.pred_boxes = Boxes(mbrm.refine(x_profiles, y_profiles, boxes))
    return refined


def pasted_soft_masks(roi_masks, boxes, image_size, chunk_size):
    """Yield Mask R-CNN's RoI mask probabilities pasted into the image, ``chunk_size`` detections at a time.

    Args:
        roi_masks: (N, M, M) probabilities; boxes: (N, 4) in the frame of ``image_size`` (H, W).
    Yields:
        (n, H, W) float masks in [0, 1]. Detectron2's pasting at threshold -1 returns 0..255 uint8,
        so the values are quantised to steps of 1/255 (far below MBRM's sensitivity).
    """
    for start in range(0, len(roi_masks), chunk_size):
        chunk = slice(start, start + chunk_size)
        yield paste_masks_in_image(roi_masks[chunk], boxes[chunk], image_size, threshold=-1).float() / 255


@META_ARCH_REGISTRY.register()
class GeneralizedRCNNWithMBRM(GeneralizedRCNN):
    """Detectron2's ``GeneralizedRCNN`` (Mask R-CNN) whose boxes, with ``mbrm`` set, are refined by MBRM
    from the soft pasted masks after the usual post-processing. Outputs are otherwise identical
    (same masks, scores, classes); without ``mbrm`` the model is exactly ``GeneralizedRCNN``.

    Soft masks exist only inside the box they are pasted into (plus the bilinear fringe of half a RoI
    cell), so MBRM can move a side outwards by at most about that fringe; it mostly tightens boxes.
    """

    @configurable
    def __init__(self, *, mbrm: Optional[MBRM] = None, mask_chunk_size: int = 16, **kwargs):
        """
        Args (besides GeneralizedRCNN's):
            mbrm: an :class:`MBRM`, or None (no refinement).
            mask_chunk_size: detections whose full-image soft masks are pasted at once (bounds memory).
        """
        super().__init__(**kwargs)
        if mask_chunk_size < 1:
            raise ValueError(f"mask_chunk_size must be >= 1, got {mask_chunk_size}")
        self.mbrm = mbrm
        self.mask_chunk_size = mask_chunk_size
        register_empty_load_check(self)

    @classmethod
    def from_config(cls, cfg):
        if cfg.MODEL.MBRM.TRAIN:
            raise ValueError("MODEL.MBRM.TRAIN: the MBRM training stage is implemented for RDSNet only; "
                             "train MBRM there (or with rdsnet_d2.mbrm_training) and load its weights")
        if cfg.MODEL.MBRM.ENABLED and not cfg.MODEL.MASK_ON:
            raise ValueError("MODEL.MBRM.ENABLED refines boxes from predicted masks: set MODEL.MASK_ON True")
        ret = super().from_config(cfg)
        ret.update(mbrm=MBRM(cfg) if cfg.MODEL.MBRM.ENABLED else None,
                   mask_chunk_size=cfg.MODEL.MBRM.MASK_CHUNK_SIZE)
        return ret

    def inference(self, batched_inputs: List[Dict[str, torch.Tensor]],
                  detected_instances: Optional[List[Instances]] = None, do_postprocess: bool = True):
        """GeneralizedRCNN's inference; with ``do_postprocess`` and MBRM, the boxes are refined. Raw
        outputs (``do_postprocess=False``) hold RoI masks, not image masks, and are returned as they are."""
        if self.mbrm is None or not do_postprocess:
            return super().inference(batched_inputs, detected_instances, do_postprocess)
        results = super().inference(batched_inputs, detected_instances, do_postprocess=False)
        return postprocess_per_image(results, batched_inputs, [r.image_size for r in results],
                                     self._postprocess_with_mbrm)

    def _postprocess_with_mbrm(self, raw: Instances, height, width):
        """One image's raw outputs -> Detectron2's ``detector_postprocess`` at ``height`` x ``width``, with
        the boxes refined by MBRM from the soft pasted masks."""
        # detector_postprocess replaces pred_masks by binary pasted masks (and drops empty boxes):
        # keep the soft RoI masks in a field that it indexes along.
        raw.roi_mask_probs = raw.pred_masks[:, 0]
        instances = detector_postprocess(raw, height, width)
        soft = pasted_soft_masks(instances.roi_mask_probs, instances.pred_boxes.tensor,
                                 instances.image_size, self.mask_chunk_size)
        instances = refine_instances_with_mbrm(self.mbrm, instances, soft)
        instances.remove("roi_mask_probs")
        return instances
