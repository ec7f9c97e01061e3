"""ROI heads that give the box head the RoI count of each image (so an NL-RoI block attends only within
an image) and apply Soft-NMS / box voting at test time."""
from typing import Dict, List

import torch
from detectron2.config import configurable
from detectron2.modeling.roi_heads import ROI_HEADS_REGISTRY, CascadeROIHeads, StandardROIHeads
from detectron2.modeling.roi_heads.cascade_rcnn import _ScaleGradient
from detectron2.structures import Boxes, Instances

from d2ext.layers import check_image_sizes

from .head_mixin import NLRoIHeadMixin
from .inference import (PostprocessSettings, SoftNMSFastRCNNOutputLayers, applies_soft_postprocess,
                        fast_rcnn_inference_soft)


def run_box_head(box_head, box_features: torch.Tensor, proposals: List[Instances]) -> torch.Tensor:
    """Box head on (N, D, H, W) pooled features; NL-RoI heads also get the per-image RoI counts."""
    if isinstance(box_head, NLRoIHeadMixin):
        return box_head(box_features, [len(p) for p in proposals])
    return box_head(box_features)


class RejectsEmptyImagesMixin:
    """Put before a Detectron2 ``ROIHeads`` class: an image without pixels is an error naming the input.
    Detectron2's ``GeneralizedRCNN`` passes it on to the heads, whose detections it then fails to rescale."""

    def forward(self, images, features, proposals, targets=None):
        check_image_sizes(images.image_sizes)
        return super().forward(images, features, proposals, targets)


@ROI_HEADS_REGISTRY.register()
class NLRoIROIHeads(RejectsEmptyImagesMixin, StandardROIHeads):
    """``StandardROIHeads`` for NL-RoI heads, with optional Soft-NMS and box voting.

    With stock heads and post-processing off it computes exactly what ``StandardROIHeads`` computes,
    so it is also the plain counterpart of an NL-RoI model (same post-processing, no block).
    """

    @classmethod
    def _init_box_head(cls, cfg, input_shape):
        ret = super()._init_box_head(cfg, input_shape)
        ret["box_predictor"] = SoftNMSFastRCNNOutputLayers(cfg, ret["box_head"].output_shape)
        return ret

    def _forward_box(self, features: Dict[str, torch.Tensor], proposals: List[Instances]):
        """Same contract as ``StandardROIHeads._forward_box``: losses in training, Instances at test."""
        box_features = self.box_pooler([features[f] for f in self.box_in_features],
                                       [p.proposal_boxes for p in proposals])
        predictions = self.box_predictor(run_box_head(self.box_head, box_features, proposals))
        del box_features
        if not self.training:
            return self.box_predictor.inference(predictions, proposals)[0]
        losses = self.box_predictor.losses(predictions, proposals)
        if self.train_on_pred_boxes:  # after the losses: it overwrites proposal_boxes in place
            with torch.no_grad():
                refined = self.box_predictor.predict_boxes_for_gt_classes(predictions, proposals)
                for proposals_per_image, boxes in zip(proposals, refined):
                    proposals_per_image.proposal_boxes = Boxes(boxes)
        return losses


@ROI_HEADS_REGISTRY.register()
class NLRoICascadeROIHeads(RejectsEmptyImagesMixin, CascadeROIHeads):
    """``CascadeROIHeads`` whose stage box heads may be NL-RoI heads, with optional Soft-NMS and box
    voting on the stage-averaged scores."""

    @configurable
    def __init__(self, *, postprocess: PostprocessSettings = PostprocessSettings(), **kwargs):
        super().__init__(**kwargs)
        self.postprocess = postprocess

    @classmethod
    def from_config(cls, cfg, input_shape):
        return {**super().from_config(cfg, input_shape), "postprocess": PostprocessSettings.from_config(cfg)}

    def _run_stage(self, features: List[torch.Tensor], proposals: List[Instances], stage: int):
        box_features = self.box_pooler(features, [p.proposal_boxes for p in proposals])
        if self.training:  # as Detectron2: sum the stage losses but scale the feature gradients
            box_features = _ScaleGradient.apply(box_features, 1.0 / self.num_cascade_stages)
        return self.box_predictor[stage](run_box_head(self.box_head[stage], box_features, proposals))

    def _forward_box(self, features, proposals, targets=None):
        if self.training or not applies_soft_postprocess(self.postprocess):
            return super()._forward_box(features, proposals, targets)
        features = [features[f] for f in self.box_in_features]
        image_sizes = [p.image_size for p in proposals]
        stage_probs = []
        for stage in range(self.num_cascade_stages):
            if stage > 0:
                proposals = self._create_proposals_from_boxes(boxes, image_sizes)
            predictions = self._run_stage(features, proposals, stage)
            predictor = self.box_predictor[stage]
            boxes = predictor.predict_boxes(predictions, proposals)
            stage_probs.append(predictor.predict_probs(predictions, proposals))
        scores = [sum(per_stage) / self.num_cascade_stages for per_stage in zip(*stage_probs)]
        return fast_rcnn_inference_soft(
            boxes, scores, image_sizes, predictor.test_score_thresh, predictor.test_nms_thresh,
            predictor.test_topk_per_image, self.postprocess,
        )[0]
