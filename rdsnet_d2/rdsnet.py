"""RDSNet meta-architecture: an object stream on Detectron2's RetinaNet machinery (anchors, Matcher,
Box2BoxTransform, focal + smooth-L1 losses) and a pixel stream, fused by correlation and cropping, with
MBRM as an optional box refinement and its own training stage."""
from typing import Dict, List

import torch
from detectron2.config import configurable
from detectron2.layers import batched_nms, cat
from detectron2.modeling import META_ARCH_REGISTRY, RetinaNet
from detectron2.structures import Boxes, Instances, pairwise_iou
from torch.nn import functional as F

from d2ext.layers import (capped_count, ensure_gt_masks, padded_bitmasks, postprocess_full_image_masks,
                          register_empty_load_check)

from .checkpoint import rename_official_rdsnet_keys
from .correlation import correlate
from .cropping import crop_masks, expanded_crop_boxes
from .mask_loss import IGNORE, ohem_mask_loss
from .mbrm import MBRM, cat_profiles
from .mbrm_training import mbrm_training_loss
from .object_stream import RDSNetHead
from .pixel_stream import PixelStream


@META_ARCH_REGISTRY.register()
class RDSNet(RetinaNet):
    """RDSNet (Wang et al., AAAI 2020). Inference returns, per image, ``Instances`` at the original
    image size with ``pred_boxes``, ``scores``, ``pred_classes`` and boolean ``pred_masks`` (N, H, W)."""

    _version = 2  # version 1 = the official repository's (mmdet v1) parameter names

    @configurable
    def __init__(self, *, pixel_stream, mask_stride, rep_dim, mask_samples_per_image=100,
                 mask_min_area=100, train_crop_expand=0.25, ohem_neg_pos_ratio=1.0, mask_loss_weight=1.0,
                 test_crop_expand=0.1, mask_threshold=0.4, mask_chunk_size=16, mbrm=None,
                 mbrm_on=False, mbrm_train=False, mbrm_train_iou=0.5, official_anchor_layout=(3, 3),
                 **kwargs):
        """
        Args (besides RetinaNet's; ``head`` is an :class:`RDSNetHead`):
            pixel_stream: a :class:`PixelStream`, producing (B, d, H / mask_stride, W / mask_stride).
            rep_dim: d.
            mask_samples_per_image, mask_min_area: positive anchors per image whose masks are trained,
                among those whose GT mask has more than ``mask_min_area`` pixels.
            train_crop_expand, test_crop_expand: crop expansion p in training / at test.
            mbrm: an :class:`MBRM` (or None); mbrm_on: refine boxes at inference;
            mbrm_train: the MBRM training stage (everything else frozen, only ``loss_mbrm``).
            official_anchor_layout: (sizes, aspect ratios) per cell, to reorder official checkpoints.
        """
        super().__init__(**kwargs)
        if mask_chunk_size < 1:
            raise ValueError(f"MODEL.RDSNET.MASK_CHUNK_SIZE must be >= 1, got {mask_chunk_size}")
        if not 0.0 <= mask_threshold <= 1.0:
            raise ValueError(f"MODEL.RDSNET.MASK_THRESHOLD must be in [0, 1], got {mask_threshold}")
        if (mbrm_on or mbrm_train) and mbrm is None:
            raise ValueError("MODEL.MBRM.ENABLED / TRAIN need an MBRM module")
        self.pixel_stream = pixel_stream
        self.mask_stride = mask_stride
        self.rep_dim = rep_dim
        self.mask_samples_per_image = mask_samples_per_image
        self.mask_min_area = mask_min_area
        self.train_crop_expand = train_crop_expand
        self.ohem_neg_pos_ratio = ohem_neg_pos_ratio
        self.mask_loss_weight = mask_loss_weight
        self.test_crop_expand = test_crop_expand
        self.mask_threshold = mask_threshold
        self.mask_chunk_size = mask_chunk_size
        self.mbrm = mbrm
        self.mbrm_on = mbrm_on
        self.mbrm_train = mbrm_train
        self.mbrm_train_iou = mbrm_train_iou
        self.official_anchor_layout = tuple(official_anchor_layout)
        # The running count of positive anchors that divides loss_cls / loss_box_reg (RetinaNet's
        # ``_ema_update``, which starts it at 100): a buffer, so that checkpoints keep it and a resumed run
        # continues it (as a plain attribute it restarted at 100). Official checkpoints lack it: kept at 100.
        self.register_buffer("loss_normalizer", torch.tensor(100.0))
        register_empty_load_check(self)
        if mbrm_train:
            for name, parameter in self.named_parameters():
                parameter.requires_grad_(name.startswith("mbrm."))

    @classmethod
    def from_config(cls, cfg):
        if not cfg.MODEL.MASK_ON:
            raise ValueError("RDSNet trains on instance masks: set MODEL.MASK_ON True (the data mapper "
                             "loads masks only then)")
        ret = super().from_config(cfg)  # backbone, anchors, matcher, box coder, loss / test settings
        backbone_shape = ret["backbone"].output_shape()
        missing = [f for f in cfg.MODEL.RETINANET.IN_FEATURES if f not in backbone_shape]
        if missing:
            raise ValueError(f"MODEL.RETINANET.IN_FEATURES: {missing} not in the backbone's outputs")
        ret["head"] = RDSNetHead(cfg, [backbone_shape[f] for f in cfg.MODEL.RETINANET.IN_FEATURES])
        pixel_stream = PixelStream(cfg, backbone_shape)
        use_mbrm = cfg.MODEL.MBRM.ENABLED or cfg.MODEL.MBRM.TRAIN
        ret.update(
            pixel_stream=pixel_stream,
            mask_stride=backbone_shape[cfg.MODEL.RDSNET.PIXEL_IN_FEATURES[0]].stride // 2,
            rep_dim=cfg.MODEL.RDSNET.REP_DIM,
            mask_samples_per_image=cfg.MODEL.RDSNET.MASK_SAMPLES_PER_IMAGE,
            mask_min_area=cfg.MODEL.RDSNET.MASK_MIN_AREA,
            train_crop_expand=cfg.MODEL.RDSNET.TRAIN_CROP_EXPAND,
            ohem_neg_pos_ratio=cfg.MODEL.RDSNET.OHEM_NEG_POS_RATIO,
            mask_loss_weight=cfg.MODEL.RDSNET.MASK_LOSS_WEIGHT,
            test_crop_expand=cfg.MODEL.RDSNET.TEST_CROP_EXPAND,
            mask_threshold=cfg.MODEL.RDSNET.MASK_THRESHOLD,
            mask_chunk_size=cfg.MODEL.RDSNET.MASK_CHUNK_SIZE,
            mbrm=MBRM(cfg) if use_mbrm else None,
            mbrm_on=cfg.MODEL.MBRM.ENABLED,
            mbrm_train=cfg.MODEL.MBRM.TRAIN,
            mbrm_train_iou=cfg.MODEL.MBRM.TRAIN_IOU,
            official_anchor_layout=(len(cfg.MODEL.ANCHOR_GENERATOR.SIZES[0]),
                                    len(cfg.MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS[0])),
        )
        return ret

    def train(self, mode=True):
        super().train(mode)
        if self.mbrm_train:  # the MBRM stage runs the frozen detector in inference mode (BN statistics)
            for name, child in self.named_children():
                if name != "mbrm":
                    child.train(False)
        return self

    def forward(self, batched_inputs: List[Dict[str, torch.Tensor]]):
        """Detectron2's model contract: losses in training, ``[{"instances": Instances}]`` otherwise."""
        if not self.training:
            return self.inference(batched_inputs)
        if any("instances" not in x for x in batched_inputs):
            raise ValueError("RDSNet: training inputs need 'instances' (annotations)")
        gt_instances = [x["instances"].to(self.device) for x in batched_inputs]
        if self.mbrm_train:
            return self._mbrm_stage_losses(batched_inputs, gt_instances)
        return self.forward_training(*self._run_streams(batched_inputs), gt_instances)

    def _run_streams(self, batched_inputs):
        images = self.preprocess_image(batched_inputs)
        all_features = self.backbone(images.tensor)
        features = [all_features[f] for f in self.head_in_features]
        predictions = self._transpose_dense_predictions(
            self.head(features), [self.num_classes, 4, 2 * self.rep_dim])
        return images, features, predictions, self.pixel_stream(all_features)

    # ------------------------------------------------------------------ training
    def forward_training(self, images, features, predictions, pixel_reps, gt_instances):
        pred_logits, pred_deltas, pred_reps = predictions
        anchors = self.anchor_generator(features)
        gt_labels, gt_boxes, matched_idxs = self.match_anchors(anchors, gt_instances)
        losses = self.losses(anchors, pred_logits, gt_labels, pred_deltas, gt_boxes)
        reps = cat(pred_reps, dim=1)  # (B, R, 2d)
        image_indices, anchor_indices, targets = self.mask_targets(
            images, pixel_reps, gt_labels, matched_idxs, gt_instances)
        if targets.shape[0] == 0:  # no mask to train: zero, keeping every parameter in the graph
            loss_mask = (pixel_reps.sum() + reps.sum()) * 0.0
        else:
            object_reps = reps[image_indices, anchor_indices].view(-1, 2, self.rep_dim)
            logits = correlate(pixel_reps, object_reps, image_indices)
            loss_mask = ohem_mask_loss(logits, targets, self.ohem_neg_pos_ratio)
        losses["loss_mask"] = self.mask_loss_weight * loss_mask
        return losses

    @torch.no_grad()
    def match_anchors(self, anchors, gt_instances):
        """RetinaNet's anchor labelling, also returning each anchor's matched GT index.

        Returns three per-image lists: labels (R,) in {-1 ignore, 0..K-1, K background}, matched GT
        boxes (R, 4) and matched GT indices (R,) (meaningful for foreground anchors only).
        """
        anchors = Boxes.cat(anchors)
        labels, boxes, indices = [], [], []
        for gt in gt_instances:
            if len(gt) == 0:  # an image without annotations: every anchor is background
                matched = torch.zeros(len(anchors), dtype=torch.long, device=anchors.device)
                labels.append(torch.full_like(matched, self.num_classes))
                boxes.append(torch.zeros_like(anchors.tensor))
                indices.append(matched)
                continue
            matched, match_labels = self.anchor_matcher(pairwise_iou(gt.gt_boxes, anchors))
            label = gt.gt_classes[matched].clone()
            label[match_labels == 0] = self.num_classes
            label[match_labels == -1] = -1
            labels.append(label)
            boxes.append(gt.gt_boxes.tensor[matched])
            indices.append(matched)
        return labels, boxes, indices

    @torch.no_grad()
    def _gt_masks_at_mask_stride(self, gt, padded_size, mask_size):
        """(G, h, w) bool at the mask stride and the GT pixel areas (G,) at input resolution."""
        padded = padded_bitmasks(ensure_gt_masks(gt, "RDSNet").gt_masks, padded_size, self.device).float()
        small = F.interpolate(padded[None], size=mask_size, mode="bilinear", align_corners=False)[0] > 0.5
        return small, padded.flatten(1).sum(dim=1)

    @torch.no_grad()
    def mask_targets(self, images, pixel_reps, gt_labels, matched_idxs, gt_instances):
        """Sample the mask-trained anchors and build their targets.

        Returns:
            image_indices (M,), anchor_indices (M,) (into the levels' concatenated anchors) and
            targets (M, h, w) long at the mask stride: 1 / 0 inside the crop of the expanded GT box,
            -1 (ignored) outside.
        """
        mask_size = pixel_reps.shape[-2:]
        padded_size = images.tensor.shape[-2:]
        image_indices, anchor_indices, targets = [], [], []
        for i, (labels, matched, gt) in enumerate(zip(gt_labels, matched_idxs, gt_instances)):
            anchors = torch.nonzero((labels >= 0) & (labels != self.num_classes)).squeeze(1)
            if anchors.numel() == 0:
                continue
            gt_small, areas = self._gt_masks_at_mask_stride(gt, padded_size, mask_size)
            anchors = anchors[areas[matched[anchors]] > self.mask_min_area]
            anchors = anchors[torch.randperm(anchors.numel(), device=anchors.device)[: self.mask_samples_per_image]]
            gt_index = matched[anchors]
            crops = expanded_crop_boxes(gt.gt_boxes.tensor[gt_index] / self.mask_stride,
                                        self.train_crop_expand, mask_size[0], mask_size[1])
            target = gt_small[gt_index].long()
            target[~crop_masks(crops, mask_size[0], mask_size[1])] = IGNORE
            targets.append(target)
            anchor_indices.append(anchors)
            image_indices.append(torch.full_like(anchors, i))
        if not targets:
            none = torch.zeros(0, dtype=torch.long, device=pixel_reps.device)
            return none, none, torch.zeros((0, *mask_size), dtype=torch.long, device=pixel_reps.device)
        return cat(image_indices), cat(anchor_indices), cat(targets)

    # ------------------------------------------------------------------ inference
    def inference(self, batched_inputs: List[Dict[str, torch.Tensor]], do_postprocess=True):
        """As ``GeneralizedRCNN.inference``: per image ``{"instances": Instances}`` with masks formed at
        the original size (the official resizing, see :meth:`instance_masks`). Without
        ``do_postprocess`` (what export traces): the ``Instances`` with masks formed at the input size;
        :meth:`postprocess` then resizes those binary masks, which equals the official resizing only
        when the input is not resized."""
        images, features, predictions, pixel_reps = self._run_streams(batched_inputs)
        outputs = []
        for i, detections in enumerate(self.detect(images, features, predictions)):
            output_size = detections.image_size
            if do_postprocess:
                output_size = (int(batched_inputs[i].get("height", output_size[0])),
                               int(batched_inputs[i].get("width", output_size[1])))
            instances, _ = self.instance_masks(detections, pixel_reps[i], images.tensor.shape[-2:], output_size,
                                               refine=self.mbrm_on)
            outputs.append({"instances": instances} if do_postprocess else instances)
        return outputs

    def postprocess(self, results: Instances, height, width):
        """Input-size ``Instances`` (``inference(..., do_postprocess=False)``) -> the original size."""
        return postprocess_full_image_masks(results, height, width)

    def detect(self, images, features, predictions):
        """Per image: ``Instances`` at the input size with pred_boxes, scores, pred_classes and
        ``object_reps`` (N, 2, d) of the anchor each detection comes from."""
        pred_logits, pred_deltas, pred_reps = predictions
        anchors = self.anchor_generator(features)
        results = []
        for i, image_size in enumerate(images.image_sizes):
            boxes, scores, classes, reps = [], [], [], []
            for level_anchors, logits, deltas, level_reps in zip(anchors, pred_logits, pred_deltas, pred_reps):
                level_scores = logits[i].sigmoid().flatten()
                candidates = torch.nonzero(level_scores > self.test_score_thresh).squeeze(1)
                top = level_scores[candidates].topk(capped_count(candidates.shape[0], self.test_topk_candidates))
                candidates = candidates[top.indices]
                anchor_idx = candidates // self.num_classes
                boxes.append(self.box2box_transform.apply_deltas(deltas[i][anchor_idx],
                                                                 level_anchors.tensor[anchor_idx]))
                scores.append(top.values)
                classes.append(candidates % self.num_classes)
                reps.append(level_reps[i][anchor_idx])
            detections = Instances(image_size, pred_boxes=Boxes(cat(boxes)), scores=cat(scores),
                                   pred_classes=cat(classes), object_reps=cat(reps).view(-1, 2, self.rep_dim))
            detections.pred_boxes.clip(image_size)
            keep = batched_nms(detections.pred_boxes.tensor, detections.scores, detections.pred_classes,
                               self.test_nms_thresh)
            results.append(detections[keep[: self.max_detections_per_image]])
        return results

    def instance_masks(self, detections, pixel_rep, padded_size, output_size, refine=False,
                       keep_profiles=False):
        """Masks of one image's detections at ``output_size``, in chunks of ``mask_chunk_size``
        detections so that peak memory does not grow with the number of detections.

        Logits are upsampled before the softmax (to the padded input, align_corners=False; sliced to
        the image; to the output size, align_corners=True). The 2-way softmax equals the sigmoid of
        the foreground-minus-background logit, and interpolation is linear, so one channel is upsampled.
        Returns ``Instances`` at ``output_size`` (boxes rescaled and clipped, empty boxes dropped, masks
        binarised at ``mask_threshold``, boxes refined by MBRM if ``refine``) and, if
        ``keep_profiles``, the soft masks' (x (N, W), y (N, H)) profiles.
        """
        input_size = detections.image_size
        out_h, out_w = output_size
        # Boxes only (rescaled, clipped, empty ones dropped): the shared helper would need every
        # detection's soft mask at once, and the official mask resizing differs (see above).
        detections = postprocess_full_image_masks(detections, out_h, out_w)
        boxes = detections.pred_boxes
        crops = expanded_crop_boxes(boxes.tensor, self.test_crop_expand, out_h, out_w)
        binary, profile_chunks = [], []
        if torch.jit.is_tracing():  # one chunk: a loop over the detections would unroll for the traced count
            chunks = [slice(None)]
        else:
            chunks = [slice(start, start + self.mask_chunk_size)
                      for start in range(0, len(detections), self.mask_chunk_size)]
        for chunk in chunks:
            reps = detections.object_reps[chunk]
            logits = correlate(pixel_rep[None], reps, torch.zeros(len(reps), dtype=torch.long, device=reps.device))
            fg_minus_bg = logits[:, 1:] - logits[:, :1]
            fg_minus_bg = F.interpolate(fg_minus_bg, size=tuple(padded_size), mode="bilinear", align_corners=False)
            fg_minus_bg = fg_minus_bg[:, :, : input_size[0], : input_size[1]]
            if tuple(input_size) != (out_h, out_w):
                fg_minus_bg = F.interpolate(fg_minus_bg, size=(out_h, out_w), mode="bilinear", align_corners=True)
            soft = fg_minus_bg[:, 0].sigmoid() * crop_masks(crops[chunk], out_h, out_w)
            binary.append(soft > self.mask_threshold)
            if refine or keep_profiles:
                profile_chunks.append(MBRM.profiles(soft))
        device = pixel_rep.device
        masks = cat(binary) if binary else torch.zeros((0, out_h, out_w), dtype=torch.bool, device=device)
        profiles = cat_profiles(profile_chunks, output_size, device)
        if refine:
            boxes = Boxes(self.mbrm.refine(profiles[0], profiles[1], boxes.tensor))
        result = Instances(output_size, pred_boxes=boxes, scores=detections.scores,
                           pred_classes=detections.pred_classes, pred_masks=masks)
        return result, (profiles if keep_profiles else None)

    # ------------------------------------------------------------------ MBRM stage
    def _mbrm_stage_losses(self, batched_inputs, gt_instances):
        with torch.no_grad():
            images, features, predictions, pixel_reps = self._run_streams(batched_inputs)
            detections = []
            for i, dets in enumerate(self.detect(images, features, predictions)):
                instances, (x_prof, y_prof) = self.instance_masks(
                    dets, pixel_reps[i], images.tensor.shape[-2:], dets.image_size, keep_profiles=True)
                detections.append((instances.pred_boxes.tensor, x_prof, y_prof))
        return mbrm_training_loss(self.mbrm, detections, gt_instances, self.mbrm_train_iou)

    # ------------------------------------------------------------------ checkpoints
    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        version = local_metadata.get("version", None)
        if version is None or version < 2:
            rename_official_rdsnet_keys(self, state_dict, prefix, error_msgs)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
