"""RDSNet meta-architecture: an object stream on Detectron2's RetinaNet machinery (anchors, Matcher,
Box2BoxTransform, focal + smooth-L1 losses) and a pixel stream, fused by correlation and cropping, with
MBRM as an optional box refinement and its own training stage."""
import torch
from detectron2.config import configurable
from detectron2.layers import batched_nms, cat
from detectron2.modeling import META_ARCH_REGISTRY, RetinaNet, build_backbone
from detectron2.structures import Boxes, Instances, pairwise_iou

from d2ext.config_checks import check_every_feature_read, check_in_features
from d2ext.layers import capped_count, check_gt_classes, check_input_images, register_empty_load_check

from .checkpoint import rename_official_rdsnet_keys
from .masks import RDSNetMasks
from .object_stream import RDSNetHead, level_anchor_positions


@META_ARCH_REGISTRY.register()
class RDSNet(RDSNetMasks, RetinaNet):
    """RDSNet (Wang et al., AAAI 2020). Inference returns, per image, ``Instances`` at the original
    image size with ``pred_boxes``, ``scores``, ``pred_classes`` and boolean ``pred_masks`` (N, H, W)."""

    _version = 2  # version 1 = the official repository's (mmdet v1) parameter names

    @configurable
    def __init__(self, *, mask_options, official_anchor_layout=(3, 3), **kwargs):
        """
        Args (besides RetinaNet's; ``head`` is an :class:`RDSNetHead`):
            mask_options: the mask side's arguments (:meth:`RDSNetMasks.init_masks`).
            official_anchor_layout: (sizes, aspect ratios) per cell, to reorder official checkpoints.
        """
        super().__init__(**kwargs)
        self.official_anchor_layout = tuple(official_anchor_layout)
        # The running count of positive anchors that divides loss_cls / loss_box_reg (RetinaNet's
        # ``_ema_update``, which starts it at 100): a buffer, so that checkpoints keep it and a resumed run
        # continues it (as a plain attribute it restarted at 100). Official checkpoints lack it: kept at 100.
        self.register_buffer("loss_normalizer", torch.tensor(100.0))
        self.reference_checkpoints_lack = ("loss_normalizer",)
        self.init_masks(**mask_options)
        register_empty_load_check(self)

    @classmethod
    def from_config(cls, cfg):
        try:
            ret = super().from_config(cfg)  # backbone, anchors, matcher, box coder, loss / test settings
        except KeyError:  # Detectron2's RetinaNet indexes the backbone's shapes with its IN_FEATURES unchecked
            check_in_features("MODEL.RETINANET.IN_FEATURES", cfg.MODEL.RETINANET.IN_FEATURES,
                              build_backbone(cfg).output_shape())
            raise
        # Past this point RetinaNet has read the shape of every IN_FEATURES level: all exist.
        backbone_shape = ret["backbone"].output_shape()
        check_every_feature_read(
            backbone_shape,
            {"MODEL.RETINANET.IN_FEATURES": cfg.MODEL.RETINANET.IN_FEATURES,
             "MODEL.RDSNET.PIXEL_IN_FEATURES": cfg.MODEL.RDSNET.PIXEL_IN_FEATURES},
            "set MODEL.RDSNET.TOP_LEVELS (levels above P5) or MODEL.FPN.IN_FEATURES to build only what is read",
        )
        ret["head"] = RDSNetHead(cfg, [backbone_shape[f] for f in cfg.MODEL.RETINANET.IN_FEATURES])
        ret.update(
            mask_options=cls.mask_options(cfg, backbone_shape),
            official_anchor_layout=(len(cfg.MODEL.ANCHOR_GENERATOR.SIZES[0]),
                                    len(cfg.MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS[0])),
        )
        return ret

    def preprocess_image(self, batched_inputs):
        check_input_images(batched_inputs, len(self.pixel_mean))
        return super().preprocess_image(batched_inputs)

    def _run_streams(self, batched_inputs):
        images = self.preprocess_image(batched_inputs)
        all_features = self.backbone(images.tensor)
        features = [all_features[f] for f in self.head_in_features]
        logits, deltas, rep_features = self.head(features)
        pred_logits, pred_deltas = self._transpose_dense_predictions([logits, deltas], [self.num_classes, 4])
        return images, features, (pred_logits, pred_deltas, rep_features), self.pixel_stream(all_features)

    # ------------------------------------------------------------------ training
    def training_losses(self, batched_inputs, gt_instances):
        """RetinaNet's losses and ``loss_mask`` on the foreground anchors."""
        check_gt_classes(gt_instances, self.num_classes, "MODEL.RETINANET.NUM_CLASSES")
        images, features, predictions, pixel_reps = self._run_streams(batched_inputs)
        pred_logits, pred_deltas, rep_features = predictions
        anchors = self.anchor_generator(features)
        gt_labels, gt_boxes, matched_idxs = self.match_anchors(anchors, gt_instances)
        losses = self.losses(anchors, pred_logits, gt_labels, pred_deltas, gt_boxes)
        # The positives of the mask side: foreground anchors, image-major.
        labels = torch.stack(gt_labels)
        positive_images, positive_anchors = torch.nonzero((labels >= 0) & (labels != self.num_classes), as_tuple=True)
        positive_gt = torch.stack(matched_idxs)[positive_images, positive_anchors]
        positive_reps = self.head.object_representations(
            rep_features, positive_images, *self.head.anchor_positions(rep_features, positive_anchors)).flatten(1)
        losses["loss_mask"] = self.mask_loss(images.tensor.shape[-2:], pixel_reps, positive_images, positive_gt,
                                             positive_reps, gt_instances)
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

    # ------------------------------------------------------------------ inference
    def run_detection(self, batched_inputs):
        """The mask side's input: the padded images, per image the detections at the input size with their
        anchors' ``object_reps`` (:meth:`detect`), and the pixel representations."""
        images, features, predictions, pixel_reps = self._run_streams(batched_inputs)
        return images, self.detect(images, features, predictions), pixel_reps

    def detect(self, images, features, predictions):
        """Per image: ``Instances`` at the input size with pred_boxes, scores, pred_classes and
        ``object_reps`` (N, 2, L) of the anchor each detection comes from."""
        pred_logits, pred_deltas, rep_features = predictions
        anchors = self.anchor_generator(features)
        results = []
        for i, image_size in enumerate(images.image_sizes):
            boxes, scores, classes, levels, anchor_inds, widths = [], [], [], [], [], []
            for level, (level_anchors, logits, deltas) in enumerate(zip(anchors, pred_logits, pred_deltas)):
                level_scores = logits[i].sigmoid().flatten()
                candidates = torch.nonzero(level_scores > self.test_score_thresh).squeeze(1)
                top = level_scores[candidates].topk(capped_count(candidates.shape[0], self.test_topk_candidates))
                candidates = candidates[top.indices]
                anchor_idx = candidates // self.num_classes
                boxes.append(self.box2box_transform.apply_deltas(deltas[i][anchor_idx],
                                                                 level_anchors.tensor[anchor_idx]))
                scores.append(top.values)
                classes.append(candidates % self.num_classes)
                levels.append(torch.full_like(anchor_idx, level))
                anchor_inds.append(anchor_idx)
                widths.append(torch.full_like(anchor_idx, rep_features[level].shape[-1]))
            detections = Instances(image_size, pred_boxes=Boxes(cat(boxes)), scores=cat(scores),
                                   pred_classes=cat(classes))
            detections.pred_boxes.clip(image_size)
            keep = batched_nms(detections.pred_boxes.tensor, detections.scores, detections.pred_classes,
                               self.test_nms_thresh)[: self.max_detections_per_image]
            detections = detections[keep]
            # Only the kept detections' representations: one image's features, as image 0 of a batch of one.
            cells, cell_anchors = level_anchor_positions(cat(anchor_inds)[keep], cat(widths)[keep],
                                                         self.head.num_anchors)
            detections.object_reps = self.head.object_representations(
                [f[i:i + 1] for f in rep_features], torch.zeros_like(keep), cat(levels)[keep], cells, cell_anchors)
            results.append(detections)
        return results

    # ------------------------------------------------------------------ checkpoints
    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        version = local_metadata.get("version", None)
        if version is None or version < 2:
            rename_official_rdsnet_keys(self, state_dict, prefix, error_msgs)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
