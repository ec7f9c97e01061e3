from typing import Dict, List, Optional

from torch import nn
from detectron2.config import configurable
from detectron2.layers import cat
from detectron2.modeling import META_ARCH_REGISTRY, Backbone, build_backbone, build_proposal_generator
from detectron2.modeling.postprocessing import detector_postprocess
from detectron2.structures import Instances

from d2ext.config_checks import check_values
from d2ext.layers import (PixelNormalizationMixin, check_gt_classes, ensure_gt_masks, padded_bitmasks,
                          postprocess_per_image, register_empty_load_check, semantic_targets)

from ..fcos.config import check_fcos_proposal_generator
from ..fcos.head import top_feats_conv
from ..fcos.losses import centerness_normalizer
from ..fcos.targets import centerness_targets
from ..mbrm import freeze_for_mbrm_stage, mbrm_options, mbrm_stage_losses
from .basis_module import build_basis_module
from .blender import Blender, blender_mask_loss
from .config import BLENDMASK_REQUIREMENTS
from .panoptic import panoptic_options, panoptic_postprocess, sem_seg_targets


def thing_semantic_targets(gt_instances: List[Instances], padded_size, num_classes, stride):
    """AdelaiDet's "thing" maps for the basis module's semantic loss, derived from the instance masks
    (AdelaiDet reads them from precomputed files): (N, H/stride, W/stride) int64, 0 = background,
    class c = c + 1, the smallest instance where several overlap, background in the padding."""
    check_gt_classes(gt_instances, num_classes, "MODEL.BASIS_MODULE.NUM_CLASSES")
    maps = []
    for instances in gt_instances:
        masks = padded_bitmasks(instances.gt_masks, padded_size, instances.gt_classes.device)
        maps.append(Instances(tuple(padded_size), gt_bitmasks_full=masks, gt_classes=instances.gt_classes))
    return semantic_targets(maps, num_classes, stride, background_first=True)


@META_ARCH_REGISTRY.register()
class BlendMask(PixelNormalizationMixin, nn.Module):
    """BlendMask (Chen et al., CVPR 2020): FCOS plus a bottom module predicting K bases over the image and
    a top layer predicting, for each detection, K attention maps of M x M; the blender crops the bases
    with the box (RoIAlign to R x R), resizes the attentions to R x R, softmaxes them over K and sums
    the weighted bases into the instance's mask logits.

    Inference returns ``Instances`` like Detectron2's Mask R-CNN: ``pred_boxes``, ``scores``,
    ``pred_classes`` and boolean ``pred_masks`` (R x R masks pasted into their boxes) at the original
    image size. With a ``panoptic_module`` (``MODEL.PANOPTIC_FPN.COMBINE.ENABLED``, AdelaiDet's panoptic
    BlendMask) also ``sem_seg`` and ``panoptic_seg`` as Detectron2's ``PanopticFPN``.
    """

    @configurable
    def __init__(self, *, backbone: Backbone, proposal_generator: nn.Module, basis_module: nn.Module,
                 blender: Blender, num_bases, pixel_mean, pixel_std, instance_loss_weight=1.0,
                 semantic_loss=None, mask_threshold=0.5, mbrm=None, mbrm_chunk_size=16, mbrm_train_iou=None,
                 panoptic_module: Optional[nn.Module] = None, sem_seg_num_classes=54, combine_overlap_thresh=0.5,
                 combine_stuff_area_thresh=4096, combine_instances_score_thresh=0.5):
        """
        Args:
            proposal_generator: FCOS (``predict`` / ``losses`` / ``inference``).
            basis_module: ``forward(features, semantic_targets) -> (bases, losses)``, bases at ``out_stride``.
            num_bases: K, the basis module's output channels.
            semantic_loss: None, or ``(num_classes, stride)`` of the basis module's semantic targets.
            mbrm: None, or an ``rdsnet_d2.MBRM`` that refines the boxes from the soft pasted masks at
                inference (``MODEL.MBRM.ENABLED``; see ``adet_lite/mbrm.py``).
            mbrm_chunk_size: with ``mbrm``, masks pasted at once (on GPU; one at a time on CPU).
            mbrm_train_iou: None, or the MBRM training stage (``MODEL.MBRM.TRAIN``; ``adet_lite/mbrm.py``).
            panoptic_module: None, or a Detectron2 semantic head (``SEM_SEG_HEAD_REGISTRY``: ``forward(features,
                targets) -> (logits or None, losses)``) trained on the inputs' ``sem_seg`` and combined with
                the instances at inference.
            sem_seg_num_classes: with ``panoptic_module``, its classes (0 = things, then the stuff classes).
            combine_overlap_thresh, combine_stuff_area_thresh, combine_instances_score_thresh: with
                ``panoptic_module``, the thresholds of Detectron2's ``combine_semantic_and_instance_outputs``.
        """
        super().__init__()
        self.backbone = backbone
        self.proposal_generator = proposal_generator
        self.basis_module = basis_module
        self.blender = blender
        self.top_layer = top_feats_conv(backbone.output_shape(), num_bases * blender.attn_size ** 2)
        self.instance_loss_weight = instance_loss_weight
        self.semantic_loss = semantic_loss
        self.mask_threshold = mask_threshold
        self.mbrm = mbrm
        self.mbrm_chunk_size = mbrm_chunk_size
        self.mbrm_train_iou = mbrm_train_iou
        self.panoptic_module = panoptic_module
        self.sem_seg_num_classes = sem_seg_num_classes
        self.combine_overlap_thresh = combine_overlap_thresh
        self.combine_stuff_area_thresh = combine_stuff_area_thresh
        self.combine_instances_score_thresh = combine_instances_score_thresh
        self.register_pixel_stats(pixel_mean, pixel_std)
        register_empty_load_check(self)
        freeze_for_mbrm_stage(self)

    @classmethod
    def from_config(cls, cfg):
        check_fcos_proposal_generator(cfg, "BlendMask")
        check_values(cfg.MODEL.BLENDMASK, "MODEL.BLENDMASK", BLENDMASK_REQUIREMENTS)
        if cfg.MODEL.BLENDMASK.VISUALIZE:
            raise ValueError("MODEL.BLENDMASK.VISUALIZE=True (AdelaiDet's basis visualisation) is not supported")
        backbone = build_backbone(cfg)
        output_shape = backbone.output_shape()
        basis_module = build_basis_module(cfg, output_shape)
        blender = Blender(cfg)
        pooler_scale = cfg.MODEL.BLENDMASK.POOLER_SCALES[0]
        if pooler_scale * basis_module.out_stride != 1:
            raise ValueError(f"MODEL.BLENDMASK.POOLER_SCALES {tuple(cfg.MODEL.BLENDMASK.POOLER_SCALES)} must be "
                             f"1 / the stride of the bases ({basis_module.out_stride})")
        basis = cfg.MODEL.BASIS_MODULE
        return {
            "backbone": backbone,
            "proposal_generator": build_proposal_generator(cfg, output_shape),
            "basis_module": basis_module,
            "blender": blender,
            "num_bases": basis.NUM_BASES,
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
            "instance_loss_weight": cfg.MODEL.BLENDMASK.INSTANCE_LOSS_WEIGHT,
            "semantic_loss": (basis.NUM_CLASSES, basis.COMMON_STRIDE) if basis.LOSS_ON else None,
            **mbrm_options(cfg, "BlendMask"),
            **panoptic_options(cfg, output_shape),
        }

    def forward(self, batched_inputs: List[Dict]):
        """Detectron2's meta-architecture interface: losses in training, else per image
        ``{"instances": Instances}`` at the original size (``height`` / ``width`` of the inputs), with a
        ``panoptic_module`` also ``"sem_seg"`` and ``"panoptic_seg"`` (see :meth:`inference`)."""
        if not self.training:
            return self.inference(batched_inputs)
        if self.mbrm_train_iou is not None:
            return mbrm_stage_losses(self, batched_inputs)
        images = self.preprocess_image(batched_inputs)
        features = self.backbone(images.tensor)
        if any("instances" not in x for x in batched_inputs):
            raise ValueError("BlendMask in training mode needs 'instances' in every input")
        gt_instances = [ensure_gt_masks(x["instances"].to(self.device), "BlendMask") for x in batched_inputs]
        sem_seg = None
        if self.panoptic_module is not None:
            sem_seg = sem_seg_targets(batched_inputs, images.image_sizes, images.tensor.shape[-2:],
                                      self.sem_seg_num_classes, self.panoptic_module.ignore_value, self.device)
        targets = None
        if self.semantic_loss is not None:
            targets = thing_semantic_targets(gt_instances, images.tensor.shape[-2:], *self.semantic_loss)
        bases, losses = self.basis_module(features, targets)
        predictions = self.proposal_generator.predict(features, self.top_layer)
        fcos_losses, positives = self.proposal_generator.losses(predictions, gt_instances)
        losses.update(fcos_losses)
        losses["loss_mask"] = self.instance_loss_weight * self.mask_loss(bases, positives, gt_instances)
        if sem_seg is not None:
            losses.update(self.panoptic_module(features, sem_seg)[1])  # Detectron2's loss_sem_seg
        return losses

    def inference(self, batched_inputs: List[Dict], do_postprocess=True):
        """As ``GeneralizedRCNN.inference``: per image ``{"instances": Instances}`` at the original size,
        or without ``do_postprocess`` the ``Instances`` at the input size with R x R ``pred_masks``
        (N, 1, R, R) of the boxes (what export traces; see :meth:`postprocess`).

        With a ``panoptic_module``, as Detectron2's ``PanopticFPN.inference``: per image also ``"sem_seg"``
        (C, H, W) logits and ``"panoptic_seg"`` (``combine_semantic_and_instance_outputs``: (H, W) int32
        segment ids and the segments' info) at the original size; without ``do_postprocess``, the
        ``Instances`` and the (N, C, H', W') semantic logits over the padded inputs.
        """
        images = self.preprocess_image(batched_inputs)
        features = self.backbone(images.tensor)
        bases, _ = self.basis_module(features)
        predictions = self.proposal_generator.predict(features, self.top_layer)
        detections = self.proposal_generator.inference(predictions, images.image_sizes)
        results = self.predict_masks(bases, detections)
        if self.panoptic_module is None:
            if not do_postprocess:
                return results
            return postprocess_per_image(results, batched_inputs, images.image_sizes, self.postprocess)
        sem_seg_logits, _ = self.panoptic_module(features, None)
        if not do_postprocess:
            return results, sem_seg_logits
        outputs = postprocess_per_image(results, batched_inputs, images.image_sizes, self.postprocess)
        for output, logits, image_size in zip(outputs, sem_seg_logits, images.image_sizes):
            output.update(panoptic_postprocess(output["instances"], logits, image_size, self.combine_overlap_thresh,
                                               self.combine_stuff_area_thresh, self.combine_instances_score_thresh))
        return outputs

    def postprocess(self, results: Instances, height, width):
        """Input-size ``Instances`` -> the masks pasted into their boxes at the original ``height`` x
        ``width`` (Detectron2's ``detector_postprocess``), boolean; with MBRM, the boxes refined from the
        soft pasted masks (Mask R-CNN's MBRM post-processing)."""
        if self.mbrm is None:
            result = detector_postprocess(results, height, width, self.mask_threshold)
        else:
            from rdsnet_d2.mbrm_postprocess import detector_postprocess_with_mbrm  # optional use: lazy

            result = detector_postprocess_with_mbrm(self.mbrm, results, height, width, self.mask_threshold,
                                                    self.mbrm_chunk_size)
        result.pred_masks = result.pred_masks.bool()  # v0.6 pastes an empty set as uint8
        return result

    def mask_loss(self, bases, positives: Instances, gt_instances: List[Instances]):
        """Each FCOS positive blends its attentions with the bases cropped by its ground-truth box;
        targets are the ground-truth masks cropped and resized to R x R like Mask R-CNN's.

        No early exit without positives: the empty tensors keep the bases and the top layer in the
        graph (distributed training needs every parameter used), the loss is then 0.
        """
        resolution = self.blender.resolution
        rois = self.blender.crop(bases, [x.gt_boxes for x in gt_instances])[positives.gt_inds]
        logits = self.blender(rois, positives.top_feats)
        targets = cat([x.gt_masks.crop_and_resize(x.gt_boxes.tensor, resolution).to(self.device)
                       for x in gt_instances])[positives.gt_inds]
        weights = centerness_targets(positives.reg_targets)
        return blender_mask_loss(logits, targets, weights, centerness_normalizer(weights))

    def predict_masks(self, bases, detections: List[Instances]):
        """Blend the masks of the detections of all images at once; per image, the detections get
        ``pred_masks`` (N, 1, R, R) of their boxes (the RoI-mask format ``detector_postprocess`` pastes)."""
        rois = self.blender.crop(bases, [det.pred_boxes for det in detections])
        mask_probs = self.blender(rois, cat([det.top_feat for det in detections])).sigmoid()
        for det, probs in zip(detections, mask_probs.split([len(d) for d in detections])):
            det.remove("top_feat")
            det.pred_masks = probs[:, None]
        return detections
