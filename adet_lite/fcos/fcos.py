from typing import Dict, List, Optional

import torch
from torch import nn
from detectron2.config import configurable
from detectron2.layers import ShapeSpec, cat
from detectron2.modeling import PROPOSAL_GENERATOR_REGISTRY
from detectron2.structures import ImageList, Instances
from detectron2.utils import comm
from d2ext.config_checks import check_in_features, check_norm, check_values
from d2ext.layers import check_gt_classes, is_conv3x3

from .config import FCOS_REQUIREMENTS
from .head import FCOSHead, top_feats_at_locations
from .inference import fcos_inference_single_image
from .losses import BOX_QUALITIES, LOC_LOSS_TYPES, fcos_losses, sum_over_workers
from .targets import compute_locations, fcos_targets_single_image, level_size_ranges

CLS_NORMALIZERS = ("fg", "moving_fg", "all")


def _flatten_levels(tensors: List[torch.Tensor]):
    """L tensors (N, K, Hl, Wl) -> (N, sum Hl*Wl, K), level-major then row-major."""
    return cat([t.permute(0, 2, 3, 1).reshape(t.shape[0], -1, t.shape[1]) for t in tensors], dim=1)


@PROPOSAL_GENERATOR_REGISTRY.register()
class FCOS(nn.Module):
    """FCOS (Tian et al., ICCV 2019) as a Detectron2 proposal generator, with AdelaiDet's behaviour.

    Usable as the detector of ``OneStageDetector`` and as the base of CondInst / BlendMask, which call
    :meth:`predict`, :meth:`losses` and :meth:`inference` and may pass a ``top_module`` that runs on
    the box-tower features of every level (CondInst's controller, BlendMask's attention layer).
    """

    @configurable
    def __init__(self, *, head: FCOSHead, in_features: List[str], strides: List[int], num_classes: int,
                 sizes_of_interest: List[int], center_sample=True, pos_radius=1.5, focal_alpha=0.25,
                 focal_gamma=2.0, cls_normalizer="fg", cls_weight=1.0, loc_loss_type="giou",
                 box_quality="ctrness", score_thresh_train=0.05, score_thresh_test=0.05,
                 topk_candidates_train=1000, topk_candidates_test=1000, nms_thresh=0.6,
                 max_detections_train=100, max_detections_test=100, thresh_with_ctr=False,
                 yield_proposal=False):
        super().__init__()
        if len(strides) != len(in_features):
            raise ValueError(f"MODEL.FCOS.FPN_STRIDES {strides} must give one stride per feature of "
                             f"MODEL.FCOS.IN_FEATURES {in_features}")
        if cls_normalizer not in CLS_NORMALIZERS:
            raise ValueError(f"MODEL.FCOS.LOSS_NORMALIZER_CLS must be one of {CLS_NORMALIZERS}, "
                             f"got {cls_normalizer!r}")
        if loc_loss_type not in LOC_LOSS_TYPES:
            raise ValueError(f"MODEL.FCOS.LOC_LOSS_TYPE must be one of {LOC_LOSS_TYPES}, got {loc_loss_type!r}")
        if box_quality not in BOX_QUALITIES:
            raise ValueError(f"MODEL.FCOS.BOX_QUALITY must be one of {BOX_QUALITIES}, got {box_quality!r}")
        self.fcos_head = head
        self.in_features = list(in_features)
        self.strides = list(strides)
        self.num_classes = num_classes
        self.size_ranges = level_size_ranges(sizes_of_interest, len(strides))
        self.center_sample = center_sample
        self.pos_radius = pos_radius
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma
        self.cls_normalizer = cls_normalizer
        self.cls_weight = cls_weight
        self.loc_loss_type = loc_loss_type
        self.box_quality = box_quality
        self.score_thresh = {True: score_thresh_train, False: score_thresh_test}
        self.topk_candidates = {True: topk_candidates_train, False: topk_candidates_test}
        self.max_detections = {True: max_detections_train, False: max_detections_test}
        self.nms_thresh = nms_thresh
        self.thresh_with_ctr = thresh_with_ctr
        self.yield_proposal = yield_proposal
        self.moving_num_fg = 100.0  # running positives count of the "moving_fg" normaliser (AdelaiDet's init)

    @classmethod
    def from_config(cls, cfg, input_shape: Dict[str, ShapeSpec]):
        fcos = cfg.MODEL.FCOS
        check_values(fcos, "MODEL.FCOS", FCOS_REQUIREMENTS)
        check_in_features("MODEL.FCOS.IN_FEATURES", fcos.IN_FEATURES, input_shape)
        strides = [input_shape[f].stride for f in fcos.IN_FEATURES]
        if list(fcos.FPN_STRIDES) != strides:  # they place the locations and size the centre regions
            raise ValueError(f"MODEL.FCOS.FPN_STRIDES {list(fcos.FPN_STRIDES)} must be the strides of "
                             f"MODEL.FCOS.IN_FEATURES {list(fcos.IN_FEATURES)}: {strides}")
        check_norm("MODEL.FCOS.NORM", fcos.NORM, {"the towers": input_shape[fcos.IN_FEATURES[0]].channels})
        return {
            "head": FCOSHead(cfg, [input_shape[f] for f in fcos.IN_FEATURES]),
            "in_features": fcos.IN_FEATURES,
            "strides": fcos.FPN_STRIDES,
            "num_classes": fcos.NUM_CLASSES,
            "sizes_of_interest": fcos.SIZES_OF_INTEREST,
            "center_sample": fcos.CENTER_SAMPLE,
            "pos_radius": fcos.POS_RADIUS,
            "focal_alpha": fcos.LOSS_ALPHA,
            "focal_gamma": fcos.LOSS_GAMMA,
            "cls_normalizer": fcos.LOSS_NORMALIZER_CLS,
            "cls_weight": fcos.LOSS_WEIGHT_CLS,
            "loc_loss_type": fcos.LOC_LOSS_TYPE,
            "box_quality": fcos.BOX_QUALITY,
            "score_thresh_train": fcos.INFERENCE_TH_TRAIN,
            "score_thresh_test": fcos.INFERENCE_TH_TEST,
            "topk_candidates_train": fcos.PRE_NMS_TOPK_TRAIN,
            "topk_candidates_test": fcos.PRE_NMS_TOPK_TEST,
            "nms_thresh": fcos.NMS_TH,
            "max_detections_train": fcos.POST_NMS_TOPK_TRAIN,
            "max_detections_test": fcos.POST_NMS_TOPK_TEST,
            "thresh_with_ctr": fcos.THRESH_WITH_CTR,
            "yield_proposal": fcos.YIELD_PROPOSAL,
        }

    def forward(self, images: ImageList, features: Dict[str, torch.Tensor],
                gt_instances: Optional[List[Instances]] = None, top_module: Optional[nn.Module] = None):
        """Detectron2's proposal-generator interface.

        Returns:
            proposals: per image ``Instances`` of detections (see :meth:`inference`); in training only
                with YIELD_PROPOSAL (else None).
            losses: dict of FCOS losses in training, else {}.
        """
        predictions = self.predict(features, top_module)
        if not self.training:
            return self.inference(predictions, images.image_sizes), {}
        if gt_instances is None:
            raise ValueError("FCOS in training mode needs gt_instances (the inputs carry no 'instances')")
        losses, _ = self.losses(predictions, gt_instances)
        proposals = None
        if self.yield_proposal:
            with torch.no_grad():
                proposals = self.inference(predictions, images.image_sizes)
        return proposals, losses

    def predict(self, features: Dict[str, torch.Tensor], top_module: Optional[nn.Module] = None):
        """Run the head on the features of ``in_features``.

        Returns:
            dict with ``logits`` (N, R, C), ``box_reg`` (N, R, 4) in stride units, ``quality`` (N, R),
            ``top_feats`` (N, R, K) or None (``top_module`` on the box towers; a 3x3 conv ``top_module``
            is not run here but kept as ``top_module`` for :meth:`losses` and :meth:`inference`, which run
            it at the positive locations and at the detections only), ``box_towers`` (list of
            per-level (N, D, Hl, Wl)), ``locations`` (R, 2), ``fpn_levels`` (R,), ``location_strides`` (R,),
            ``num_locations`` (per level); R = locations of all levels.
        """
        level_features = [features[f] for f in self.in_features]
        logits, box_reg, quality, box_towers = self.fcos_head(level_features)
        sparse_top = top_module is not None and is_conv3x3(top_module)
        locations, fpn_levels, location_strides = [], [], []
        for level, (feature, stride) in enumerate(zip(level_features, self.strides)):
            points = compute_locations(feature.shape[-2], feature.shape[-1], stride, feature.device)
            locations.append(points)
            fpn_levels.append(torch.full((points.shape[0],), level, dtype=torch.int64, device=points.device))
            location_strides.append(torch.full((points.shape[0],), float(stride), device=points.device))
        return {
            "logits": _flatten_levels(logits),
            "box_reg": _flatten_levels(box_reg),
            "quality": _flatten_levels(quality).squeeze(2),
            "top_feats": (_flatten_levels([top_module(t) for t in box_towers])
                          if top_module is not None and not sparse_top else None),
            "top_module": top_module if sparse_top else None,
            "box_towers": box_towers,
            "locations": cat(locations),
            "fpn_levels": cat(fpn_levels),
            "location_strides": cat(location_strides),
            "num_locations": [p.shape[0] for p in locations],
        }

    @torch.no_grad()
    def targets(self, predictions, gt_instances: List[Instances]):
        """Per-image assignment (see ``fcos_targets_single_image``).

        Returns:
            labels (N, R) int64 (``num_classes`` = background), reg_targets (N, R, 4) in units of each
            location's stride, gt_inds (N, R) int64 indices into the concatenation of the batch's
            instances (-1 = background).
        """
        locations = predictions["locations"]
        strides = predictions["location_strides"]
        size_ranges = cat([
            locations.new_tensor(rng).expand(n, 2)
            for rng, n in zip(self.size_ranges, predictions["num_locations"])
        ])
        labels, reg_targets, gt_inds = [], [], []
        offset = 0
        for instances in gt_instances:
            labels_i, reg_i, inds_i = fcos_targets_single_image(
                locations, strides, size_ranges, instances, self.num_classes, self.center_sample, self.pos_radius)
            labels.append(labels_i)
            reg_targets.append(reg_i / strides[:, None])
            gt_inds.append(torch.where(inds_i >= 0, inds_i + offset, inds_i))
            offset += len(instances)
        return torch.stack(labels), torch.stack(reg_targets), torch.stack(gt_inds)

    def losses(self, predictions, gt_instances: List[Instances]):
        """
        Returns:
            losses: dict with ``loss_fcos_cls``, ``loss_fcos_loc``, ``loss_fcos_ctr``.
            positives: ``Instances`` of the P positive locations of the batch with ``im_inds``, ``gt_inds``
                (into the concatenated batch instances), ``locations``, ``fpn_levels``, ``logits_pred``
                (P, C), ``ctrness_pred`` (P,), ``box_reg_pred`` (P, 4), ``reg_targets`` (P, 4) (stride
                units) and ``top_feats`` (P, K) if any.
        """
        check_gt_classes(gt_instances, self.num_classes, "MODEL.FCOS.NUM_CLASSES")
        labels, reg_targets, gt_inds = self.targets(predictions, gt_instances)
        num_images, num_locations = labels.shape

        num_pos = sum_over_workers(torch.tensor(float((labels != self.num_classes).sum()), device=labels.device))
        num_pos_avg = max(num_pos.item() / comm.get_world_size(), 1.0)
        if self.cls_normalizer == "fg":
            cls_normalizer = num_pos_avg
        elif self.cls_normalizer == "moving_fg":
            self.moving_num_fg = 0.9 * self.moving_num_fg + 0.1 * num_pos_avg
            cls_normalizer = self.moving_num_fg
        else:
            cls_normalizer = float(num_images * num_locations)

        losses = fcos_losses(
            predictions["logits"].flatten(0, 1), predictions["box_reg"].flatten(0, 1),
            predictions["quality"].flatten(0, 1), labels.flatten(), reg_targets.flatten(0, 1),
            cls_normalizer=cls_normalizer, num_pos_avg=num_pos_avg, focal_alpha=self.focal_alpha,
            focal_gamma=self.focal_gamma, cls_weight=self.cls_weight, loc_loss_type=self.loc_loss_type,
            box_quality=self.box_quality)

        im_inds, loc_inds = torch.nonzero(labels != self.num_classes, as_tuple=True)
        positives = Instances((0, 0))
        positives.im_inds = im_inds
        positives.gt_inds = gt_inds[im_inds, loc_inds]
        positives.locations = predictions["locations"][loc_inds]
        positives.fpn_levels = predictions["fpn_levels"][loc_inds]
        positives.logits_pred = predictions["logits"][im_inds, loc_inds]
        positives.ctrness_pred = predictions["quality"][im_inds, loc_inds]
        positives.box_reg_pred = predictions["box_reg"][im_inds, loc_inds]
        positives.reg_targets = reg_targets[im_inds, loc_inds]
        if predictions["top_feats"] is not None:
            positives.top_feats = predictions["top_feats"][im_inds, loc_inds]
        elif predictions["top_module"] is not None:
            positives.top_feats = top_feats_at_locations(predictions["top_module"], predictions["box_towers"], im_inds,
                                                         positives.fpn_levels, positives.locations, self.strides)
        return losses, positives

    def inference(self, predictions, image_sizes):
        """Per image ``Instances`` with ``pred_boxes``, ``scores``, ``pred_classes``, ``locations``,
        ``fpn_levels`` (and ``top_feat`` when ``predict`` had a ``top_module``)."""
        splits = predictions["num_locations"]
        locations = predictions["locations"].split(splits)
        results = []
        top_feats, top_module = predictions["top_feats"], predictions["top_module"]
        for i, image_size in enumerate(image_sizes):
            result = fcos_inference_single_image(
                predictions["logits"][i].split(splits), predictions["box_reg"][i].split(splits),
                predictions["quality"][i].split(splits), locations, self.strides, image_size,
                top_feats[i].split(splits) if top_feats is not None else None,
                score_thresh=self.score_thresh[self.training],
                topk_candidates=self.topk_candidates[self.training], nms_thresh=self.nms_thresh,
                max_detections=self.max_detections[self.training], thresh_with_ctr=self.thresh_with_ctr)
            if top_module is not None:
                # This image's towers only (per image, not for the batch: traced, a split of the batch's
                # features would fix the traced image's detection count), so each is padded once.
                result.top_feat = top_feats_at_locations(top_module, [t[i:i + 1] for t in predictions["box_towers"]],
                                                         torch.zeros_like(result.fpn_levels), result.fpn_levels,
                                                         result.locations, self.strides)
            results.append(result)
        return results
