"""Fast R-CNN post-processing with Soft-NMS and box voting (Detectron1's order), and the box predictor
that uses it."""
import logging
from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
from detectron2.config import configurable
from detectron2.layers import batched_nms
from detectron2.modeling.roi_heads import FastRCNNOutputLayers
from detectron2.structures import Boxes, Instances

from d2ext.config_checks import check_values

from .box_voting import box_voting, check_box_voting_args
from .config import BOX_VOTE_REQUIREMENTS, SOFT_NMS_REQUIREMENTS
from .soft_nms import batched_soft_nms, check_soft_nms_args

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PostprocessSettings:
    """What replaces Detectron2's per-class hard NMS at test time (both off = Detectron2's behaviour)."""

    soft_nms: bool = False
    soft_nms_method: str = "linear"
    soft_nms_sigma: float = 0.5
    soft_nms_score_floor: float = 1e-4
    box_vote: bool = False
    box_vote_iou_threshold: float = 0.8
    box_vote_scoring_method: str = "ID"
    box_vote_beta: float = 1.0

    @classmethod
    def from_config(cls, cfg) -> "PostprocessSettings":
        """The settings of ``MODEL.ROI_HEADS.SOFT_NMS`` / ``BOX_VOTE``; a bad value of an enabled one raises a
        ValueError naming its key."""
        roi_heads = cfg.MODEL.ROI_HEADS
        soft, vote = roi_heads.SOFT_NMS, roi_heads.BOX_VOTE
        if soft.ENABLED:
            check_values(roi_heads, "MODEL.ROI_HEADS", SOFT_NMS_REQUIREMENTS)
        if vote.ENABLED:
            check_values(roi_heads, "MODEL.ROI_HEADS", BOX_VOTE_REQUIREMENTS)
        return cls(soft.ENABLED, soft.METHOD, soft.SIGMA, soft.SCORE_FLOOR, vote.ENABLED,
                   vote.IOU_THRESHOLD, vote.SCORING_METHOD, vote.BETA)

    def check(self, nms_threshold: float):
        """Raise a ValueError naming a bad setting, for settings not built from a config."""
        if self.soft_nms:
            check_soft_nms_args(self.soft_nms_method, self.soft_nms_sigma, nms_threshold, self.soft_nms_score_floor)
        if self.box_vote:
            check_box_voting_args(self.box_vote_iou_threshold, self.box_vote_scoring_method, self.box_vote_beta)

    @property
    def changes_nms(self) -> bool:
        return self.soft_nms or self.box_vote


def fast_rcnn_inference_single_image_soft(
    boxes: torch.Tensor, scores: torch.Tensor, image_shape: Tuple[int, int], score_thresh: float,
    nms_thresh: float, topk_per_image: int, settings: PostprocessSettings,
) -> Tuple[Instances, torch.Tensor]:
    """Detectron1's per-class post-processing of one image, batched over classes.

    Score threshold -> Soft-NMS (or hard NMS) -> box voting against all thresholded boxes of the
    class -> keep the ``topk_per_image`` highest final scores.

    Args:
        boxes: (R, K*4) or (R, 4) predicted boxes; scores: (R, K+1) class probabilities (+ background).

    Returns:
        Instances with pred_boxes, scores, pred_classes; (D,) index of the proposal of each detection.
    """
    valid = torch.isfinite(boxes).all(dim=1) & torch.isfinite(scores).all(dim=1)
    if not bool(valid.all()):
        boxes, scores = boxes[valid], scores[valid]
    scores = scores[:, :-1]
    num_box_classes = boxes.shape[1] // 4
    boxes = Boxes(boxes.reshape(-1, 4))
    boxes.clip(image_shape)
    boxes = boxes.tensor.view(-1, num_box_classes, 4)  # (R, 1 or K, 4)

    candidate = (scores > score_thresh).nonzero()  # (C, 2): proposal, class
    proposal_index, classes = candidate[:, 0], candidate[:, 1]
    candidate_boxes = boxes[proposal_index, classes if num_box_classes > 1 else 0]
    candidate_scores = scores[proposal_index, classes]

    if settings.soft_nms:
        keep, kept_scores = batched_soft_nms(
            candidate_boxes, candidate_scores, classes, settings.soft_nms_method, settings.soft_nms_sigma,
            nms_thresh, settings.soft_nms_score_floor,
        )
    else:
        keep = batched_nms(candidate_boxes, candidate_scores, classes, nms_thresh)
        kept_scores = candidate_scores[keep]
    kept_boxes = candidate_boxes[keep]

    def vote(kept_boxes, kept_scores, kept_classes):
        return box_voting(kept_boxes, kept_scores, candidate_boxes, candidate_scores, settings.box_vote_iou_threshold,
                          settings.box_vote_scoring_method, settings.box_vote_beta, kept_classes, classes)

    # A kept box's vote reads the candidates, not the other kept boxes, and ID scoring leaves the scores as
    # they are: then the top-k are known before voting, and only they are voted (the same result as
    # Detectron1's vote-then-cut, without voting every box that linear Soft-NMS keeps at a low threshold).
    vote_after_cut = settings.box_vote and settings.box_vote_scoring_method == "ID"
    if settings.box_vote and not vote_after_cut:
        kept_boxes, kept_scores = vote(kept_boxes, kept_scores, classes[keep])
    order = torch.argsort(kept_scores, descending=True, stable=True)
    if topk_per_image >= 0:
        order = order[:topk_per_image]
    keep, kept_boxes, kept_scores = keep[order], kept_boxes[order], kept_scores[order]
    if vote_after_cut:
        kept_boxes, kept_scores = vote(kept_boxes, kept_scores, classes[keep])

    result = Instances(image_shape)
    result.pred_boxes = Boxes(kept_boxes)
    result.scores = kept_scores
    result.pred_classes = classes[keep]
    return result, proposal_index[keep]


def fast_rcnn_inference_soft(
    boxes: List[torch.Tensor], scores: List[torch.Tensor], image_shapes: List[Tuple[int, int]],
    score_thresh: float, nms_thresh: float, topk_per_image: int, settings: PostprocessSettings,
) -> Tuple[List[Instances], List[torch.Tensor]]:
    """Per-image :func:`fast_rcnn_inference_single_image_soft`; same return format as Detectron2's
    ``fast_rcnn_inference``."""
    results = [
        fast_rcnn_inference_single_image_soft(b, s, shape, score_thresh, nms_thresh, topk_per_image, settings)
        for b, s, shape in zip(boxes, scores, image_shapes)
    ]
    return [r[0] for r in results], [r[1] for r in results]


def applies_soft_postprocess(settings: PostprocessSettings) -> bool:
    """Whether ``settings`` replace hard NMS now: not while tracing / scripting, where the greedy Soft-NMS
    loop does not export (hard NMS then, with a warning)."""
    if not settings.changes_nms:
        return False
    if torch.jit.is_scripting() or torch.jit.is_tracing():
        logger.warning("Soft-NMS / box voting do not export: tracing with hard NMS instead.")
        return False
    return True


class SoftNMSFastRCNNOutputLayers(FastRCNNOutputLayers):
    """``FastRCNNOutputLayers`` whose inference applies :class:`PostprocessSettings` (same parameters,
    so checkpoints are unchanged). During export it falls back to hard NMS with a warning."""

    @configurable
    def __init__(self, *args, postprocess: Optional[PostprocessSettings] = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.postprocess = postprocess or PostprocessSettings()
        self.postprocess.check(self.test_nms_thresh)

    @classmethod
    def from_config(cls, cfg, input_shape):
        return {**super().from_config(cfg, input_shape), "postprocess": PostprocessSettings.from_config(cfg)}

    def inference(self, predictions, proposals: List[Instances]):
        if not applies_soft_postprocess(self.postprocess):
            return super().inference(predictions, proposals)
        return fast_rcnn_inference_soft(
            self.predict_boxes(predictions, proposals), self.predict_probs(predictions, proposals),
            [x.image_size for x in proposals], self.test_score_thresh, self.test_nms_thresh,
            self.test_topk_per_image, self.postprocess,
        )
