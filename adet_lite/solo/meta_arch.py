"""SOLO / Decoupled SOLO / Decoupled SOLO Light (``META_ARCHITECTURE: "SOLO"``, keys MODEL.SOLO) and
SOLOv2 (``"SOLOv2"``, AdelaiDet's keys MODEL.SOLOV2)."""
from typing import Dict, List

import torch
import torch.nn as nn
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY, build_backbone
from detectron2.structures import Instances

from d2ext.config_checks import check_in_features, check_norm, check_values, one_of
from d2ext.layers import (MSRA, NUM_QUADRATIC_COORDINATE_TERMS, TORCHVISION, PixelNormalizationMixin, check_gt_classes,
                          check_input_conventions, ensure_gt_masks, mask_bounding_boxes, padded_bitmasks,
                          postprocess_full_image_masks, postprocess_per_image, register_empty_load_check,
                          rename_reference_keys)

from ..mbrm import freeze_for_mbrm_stage, mbrm_options, mbrm_stage_losses
from .category_branch import CategoryBranch
from .checkpoint import MMDET, reference_format, rename_reference_key
from .config import GRID_HEAD_REQUIREMENTS, SOLOV2_REQUIREMENTS
from .inference import NMS_TYPES, GridInferenceParams, select_instances
from .losses import solo_category_loss, solo_mask_loss
from .nms import MATRIX_NMS_KERNELS, point_nms
from .solo_mask_branch import DecoupledSOLOMaskBranch, SOLOMaskBranch
from .solov2_mask_branch import KernelBranch, MaskFeatureBranch, SOLOv2MaskBranch
from .targets import assign_grid_targets
from .towers import resize_instance_levels, resized_instance_strides

SOLO_VARIANTS = ("SOLO", "DecoupledSOLO", "DecoupledSOLOLight")
_AREA_FILTER_MASK_STRIDE = 4


def _grid_options(node, node_name, requirements):
    """Options common to MODEL.SOLO and MODEL.SOLOV2, validated (with ``requirements``, the node's
    ``*_REQUIREMENTS``) with errors that name the key."""
    check_values(node, node_name, {**requirements, "NMS_TYPE": one_of(*NMS_TYPES),
                                   "NMS_KERNEL": one_of(*MATRIX_NMS_KERNELS)})
    check_norm(f"{node_name}.NORM", node.NORM, {f"{node_name}.INSTANCE_CHANNELS": node.INSTANCE_CHANNELS})
    num_levels = len(node.INSTANCE_IN_FEATURES)
    for key in ("FPN_INSTANCE_STRIDES", "FPN_SCALE_RANGES", "NUM_GRIDS"):
        if len(node[key]) != num_levels:
            raise ValueError(f"{node_name}.{key} has {len(node[key])} entries but {node_name}.INSTANCE_IN_FEATURES "
                             f"has {num_levels}: one per level is needed")
    if not node.LOSS.FOCAL_USE_SIGMOID:
        raise ValueError(f"{node_name}.LOSS.FOCAL_USE_SIGMOID=False (softmax focal loss) is not implemented")
    return {
        "instance_in_features": list(node.INSTANCE_IN_FEATURES),
        "instance_strides": list(node.FPN_INSTANCE_STRIDES),
        "scale_ranges": [tuple(r) for r in node.FPN_SCALE_RANGES],
        "num_grids": list(node.NUM_GRIDS),
        "sigma": node.SIGMA,
        "num_classes": node.NUM_CLASSES,
        "focal_alpha": node.LOSS.FOCAL_ALPHA,
        "focal_gamma": node.LOSS.FOCAL_GAMMA,
        "focal_weight": node.LOSS.FOCAL_WEIGHT,
        "dice_weight": node.LOSS.DICE_WEIGHT,
        "coverage_mask_targets": node.LOSS.COVERAGE_MASK_TARGETS,
        "inference_params": GridInferenceParams(
            score_threshold=node.SCORE_THR, mask_threshold=node.MASK_THR, nms_pre=node.NMS_PRE,
            nms_type=node.NMS_TYPE, nms_kernel=node.NMS_KERNEL, nms_sigma=node.NMS_SIGMA,
            mask_nms_threshold=node.MASK_NMS_THR, update_threshold=node.UPDATE_THR,
            max_per_image=node.MAX_PER_IMG),
    }


def _instance_channels(backbone, in_features, node_name):
    shapes = backbone.output_shape()
    check_in_features(f"{node_name}: features", in_features, shapes)
    channels = {shapes[f].channels for f in in_features}
    if len(channels) != 1:
        raise ValueError(f"{node_name}: features {in_features} must have equal channels, got {channels}")
    return channels.pop()


def _check_instance_strides(backbone, in_features, instance_strides, node_name):
    """FPN_INSTANCE_STRIDES (the mask targets' scale) must be the strides of the resized instance levels."""
    expected = resized_instance_strides([backbone.output_shape()[f].stride for f in in_features])
    if list(instance_strides) != expected:
        raise ValueError(f"{node_name}.FPN_INSTANCE_STRIDES {list(instance_strides)} must be the strides of "
                         f"{node_name}.INSTANCE_IN_FEATURES {list(in_features)} after the reference's resizing (the "
                         f"finest halved, the last at the size of the one before): {expected}")


@META_ARCH_REGISTRY.register()
class SOLO(PixelNormalizationMixin, nn.Module):
    """SOLO: an S x S grid per FPN level; each cell predicts the class and the mask of the instance whose
    centre falls in it. The mask branch decides the variant (S^2 masks, decoupled X / Y masks, or
    SOLOv2's dynamic kernels, see ``SOLOv2``)."""

    config_node = "MODEL.SOLO"  # the config node of its keys, for messages

    @configurable
    def __init__(
        self,
        *,
        backbone,
        category_branch,
        mask_branch,
        instance_in_features,
        instance_strides,
        scale_ranges,
        num_grids,
        sigma,
        num_classes,
        mask_target_strides,
        deduplicate_cells,
        focal_alpha,
        focal_gamma,
        focal_weight,
        dice_weight,
        inference_params,
        coverage_mask_targets=False,
        pixel_mean,
        pixel_std,
        input_format="BGR",
        mbrm=None,
        mbrm_chunk_size=16,
        mbrm_train_iou=None,
    ):
        """
        Args:
            mask_branch: module with ``forward(level_features, features) -> outputs``,
                ``mask_sizes(outputs)`` and ``mask_probs(outputs, image, level, cells, size)``.
            mask_target_strides: per level, the stride of the predicted masks on the input image.
            deduplicate_cells: one positive per cell (SOLO) or one per (instance, cell) pair (SOLOv2).
            input_format: ``INPUT.FORMAT`` of the images: checked against released weights' conventions on load.
            mbrm: None, or an ``rdsnet_d2.MBRM`` that refines the masks' boxes from the soft masks at
                inference (``MODEL.MBRM.ENABLED``; see ``adet_lite/mbrm.py``); mbrm_chunk_size: with it,
                detections whose full-size soft masks exist at once; mbrm_train_iou: None, or the MBRM
                training stage (``MODEL.MBRM.TRAIN``).
            The others: see ``add_solo_config``.
        """
        super().__init__()
        self.backbone = backbone
        self.category_branch = category_branch
        self.mask_branch = mask_branch
        self.instance_in_features = instance_in_features
        self.instance_strides = instance_strides
        self.scale_ranges = scale_ranges
        self.num_grids = num_grids
        self.sigma = sigma
        self.num_classes = num_classes
        self.mask_target_strides = mask_target_strides
        self.mask_stride = int(mask_target_strides[0])  # of the finest masks, those inference returns
        self.deduplicate_cells = deduplicate_cells
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma
        self.focal_weight = focal_weight
        self.dice_weight = dice_weight
        self.coverage_mask_targets = coverage_mask_targets
        self.inference_params = inference_params
        self.mbrm = mbrm
        self.mbrm_chunk_size = mbrm_chunk_size
        self.mbrm_train_iou = mbrm_train_iou
        self.input_format = input_format
        self.register_pixel_stats(pixel_mean, pixel_std)
        register_empty_load_check(self)
        freeze_for_mbrm_stage(self)

    @classmethod
    def from_config(cls, cfg):
        node = cfg.MODEL.SOLO
        if node.VARIANT not in SOLO_VARIANTS:
            raise ValueError(f"MODEL.SOLO.VARIANT must be one of {SOLO_VARIANTS}, got {node.VARIANT!r}")
        backbone = build_backbone(cfg)
        options = _grid_options(node, "MODEL.SOLO", GRID_HEAD_REQUIREMENTS)
        in_channels = _instance_channels(backbone, options["instance_in_features"], "MODEL.SOLO.INSTANCE_IN_FEATURES")
        _check_instance_strides(backbone, options["instance_in_features"], options["instance_strides"], "MODEL.SOLO")
        tower = dict(in_channels=in_channels, channels=node.INSTANCE_CHANNELS, num_convs=node.NUM_INSTANCE_CONVS,
                     norm=node.NORM, num_grids=node.NUM_GRIDS, prior_prob=node.PRIOR_PROB)
        if node.VARIANT == "SOLO":
            mask_branch = SOLOMaskBranch(**tower)
        else:
            mask_branch = DecoupledSOLOMaskBranch(**tower, shared_tower=node.VARIANT == "DecoupledSOLOLight")
        return {
            **options,
            "backbone": backbone,
            "category_branch": CategoryBranch(**tower, num_classes=node.NUM_CLASSES),
            "mask_branch": mask_branch,
            # The mask branch upsamples each level x2: masks at half the level's stride.
            "mask_target_strides": [s / 2 for s in node.FPN_INSTANCE_STRIDES],
            "deduplicate_cells": True,
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
            "input_format": cfg.INPUT.FORMAT,
            **mbrm_options(cfg, "SOLO"),
        }

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # Released mmdetection / AdelaiDet checkpoints load as they are: their keys are renamed here.
        local_keys = [k[len(prefix):] for k in state_dict if k.startswith(prefix)]
        source = reference_format(local_keys)
        if source is not None:
            # mmdetection's weights are torchvision-style (Base-SOLO.yaml), AdelaiDet's MSRA (Base-SOLOv2.yaml).
            convention, config = ((TORCHVISION, "configs/SOLO/Base-SOLO.yaml") if source == MMDET
                                  else (MSRA, "configs/SOLO/Base-SOLOv2.yaml"))
            check_input_conventions(self, convention, source, config, error_msgs)
            if getattr(self.mask_branch, "relative_coord_terms", False):
                error_msgs.append(f"{source} checkpoint: the released SOLOv2 has no relative coordinate terms; "
                                  "set MODEL.SOLOV2.RELATIVE_COORD_TERMS False to load it")
            dropped = {k for k in local_keys if rename_reference_key(k, source) == ""}
            rename_reference_keys(self, state_dict, prefix, lambda key: rename_reference_key(key, source),
                                  error_msgs, source, ignored=dropped)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def forward(self, batched_inputs: List[Dict[str, torch.Tensor]]):
        """Detectron2's model interface: losses in training, ``[{"instances": Instances}]`` at test,
        with ``pred_masks`` (N, H, W) bool at the original image size and ``pred_boxes`` derived from them."""
        if not self.training:
            return self.inference(batched_inputs)
        if self.mbrm_train_iou is not None:
            return mbrm_stage_losses(self, batched_inputs)
        for x in batched_inputs:
            if "instances" not in x:
                raise ValueError("SOLO training needs 'instances' in every input (use a dataset mapper "
                                 "with is_train=True)")
        images, category_logits, mask_outputs = self._run_branches(batched_inputs)
        gt_instances = [x["instances"].to(self.device) for x in batched_inputs]
        return self.losses(category_logits, mask_outputs, gt_instances, images.tensor.shape[-2:])

    def _run_branches(self, batched_inputs):
        """-> (``ImageList``, per level category logits, the mask branch's outputs)."""
        images = self.preprocess_image(batched_inputs)
        features = self.backbone(images.tensor)
        level_features = resize_instance_levels([features[f] for f in self.instance_in_features])
        return images, self.category_branch(level_features), self.mask_branch(level_features, features)

    def inference(self, batched_inputs: List[Dict[str, torch.Tensor]], do_postprocess=True):
        """As ``GeneralizedRCNN.inference``: per image ``{"instances": Instances}`` at the original size,
        or without ``do_postprocess`` the ``Instances`` at the input size (see :meth:`predict_instances`;
        what export traces)."""
        images, category_logits, mask_outputs = self._run_branches(batched_inputs)
        results = self.predict_instances(category_logits, mask_outputs, images)
        if not do_postprocess:
            return results
        return postprocess_per_image(results, batched_inputs, images.image_sizes, self.postprocess)

    def losses(self, category_logits, mask_outputs, gt_instances, padded_size):
        mask_sizes = self.mask_branch.mask_sizes(mask_outputs)
        category_labels = [[] for _ in self.num_grids]
        mask_probs, mask_targets = [], []
        num_positives = 0
        check_gt_classes(gt_instances, self.num_classes, f"{self.config_node}.NUM_CLASSES")
        for image, instances in enumerate(gt_instances):
            targets = assign_grid_targets(
                padded_bitmasks(ensure_gt_masks(instances, "SOLO").gt_masks, padded_size, device=self.device),
                instances.gt_boxes.tensor, instances.gt_classes,
                num_classes=self.num_classes, num_grids=self.num_grids, scale_ranges=self.scale_ranges,
                sigma=self.sigma, mask_sizes=mask_sizes, mask_strides=self.mask_target_strides,
                deduplicate_cells=self.deduplicate_cells, coverage_mask_targets=self.coverage_mask_targets)
            for level, level_targets in enumerate(targets):
                category_labels[level].append(level_targets.labels)
                mask_probs.append(self.mask_branch.mask_probs(mask_outputs, image, level, level_targets.cells))
                mask_targets.append(level_targets.masks)
                num_positives += level_targets.cells.numel()
        category_labels = [torch.stack(labels) for labels in category_labels]
        return {
            "loss_mask": solo_mask_loss(mask_probs, mask_targets, num_positives, self.dice_weight),
            "loss_cls": solo_category_loss(category_logits, category_labels, self.focal_alpha, self.focal_gamma,
                                           self.focal_weight),
        }

    @torch.no_grad()
    def predict_instances(self, category_logits, mask_outputs, images):
        """Per image: ``Instances`` of the input size (before padding) with ``scores``, ``pred_classes``,
        soft ``pred_masks`` (N, H/s, W/s) at the mask stride s (4; SOLOv2: ``MASK_OUT_STRIDE``) of the
        padded H x W input (:meth:`postprocess` upsamples them, a few at a time: 100 masks at 800 x 1333
        are 430 MB as float) and ``pred_boxes`` of the binary masks, at the input size."""
        category_scores = [point_nms(x.sigmoid()) for x in category_logits]
        # Every level's masks are compared at the finest level's mask resolution.
        size = self.mask_branch.mask_sizes(mask_outputs)[0]
        padded_size = tuple(images.tensor.shape[-2:])
        if not torch.jit.is_tracing() and tuple(s * self.mask_stride for s in size) != padded_size:
            raise ValueError(f"{type(self).__name__}: masks of {tuple(size)} at stride {self.mask_stride} do not "
                             f"cover the padded input {padded_size}: check MODEL.FPN / the INSTANCE_STRIDES keys")
        # The reference keeps masks with more pixels than their level's stride, counted on stride-4 masks:
        # the same areas in pixels of this model's masks.
        min_areas = [stride * (_AREA_FILTER_MASK_STRIDE / self.mask_stride) ** 2 for stride in self.instance_strides]
        results = []
        for image, (height, width) in enumerate(images.image_sizes):

            def cell_mask_probs(levels, cells, image=image):
                # Every level, also those without candidates: the loop does not depend on the data (traces).
                selected = [levels == level for level in range(len(self.num_grids))]
                per_level = [self.mask_branch.mask_probs(mask_outputs, image, level, cells[chosen], size)
                             for level, chosen in enumerate(selected)]
                masks = per_level[0].new_zeros((cells.shape[0], *size))  # their dtype (half under autocast)
                for chosen, probs in zip(selected, per_level):
                    masks[chosen] = probs
                return masks

            masks, scores, classes = select_instances(
                [s[image] for s in category_scores], min_areas, cell_mask_probs, self.inference_params)
            result = Instances((height, width))
            result.pred_masks = masks
            result.scores = scores
            result.pred_classes = classes
            boxes = mask_bounding_boxes(masks > self.inference_params.mask_threshold)
            boxes.scale(self.mask_stride, self.mask_stride)
            boxes.clip((height, width))
            result.pred_boxes = boxes
            results.append(result)
        return results

    def input_size_masks(self, masks, image_size):
        """Soft masks at the mask stride over the padded input (:meth:`predict_instances`) -> (N, h, w) over the
        input image of ``image_size``: upsampled to the padded input, then cropped (as the reference)."""
        padded_size = (masks.shape[-2] * self.mask_stride, masks.shape[-1] * self.mask_stride)
        upsampled = F.interpolate(masks[:, None], size=padded_size, mode="bilinear", align_corners=False)
        return upsampled[:, 0, : image_size[0], : image_size[1]]

    def postprocess(self, result, height, width):
        """To the original image size; boxes re-derived from the final masks (with MBRM, those boxes
        refined from the soft masks); empty masks dropped."""
        threshold = self.inference_params.mask_threshold
        if self.mbrm is None:
            result = postprocess_full_image_masks(result, height, width, threshold,
                                                  input_size_masks=self.input_size_masks)
            result.pred_boxes = mask_bounding_boxes(result.pred_masks)
        else:
            result = postprocess_full_image_masks(result, height, width, threshold,
                                                  refine_boxes=self._refined_mask_boxes,
                                                  chunk_size=self.mbrm_chunk_size, input_size_masks=self.input_size_masks)
        return result[result.pred_masks.flatten(1).any(dim=1)]

    def _refined_mask_boxes(self, soft_masks, boxes):
        """MBRM hook of ``postprocess_full_image_masks``: SOLO's boxes are those of its final binary masks
        (not the incoming ``boxes``, those of the input-size masks), refined by MBRM from the soft masks."""
        binary = soft_masks > self.inference_params.mask_threshold
        return self.mbrm(soft_masks, mask_bounding_boxes(binary).tensor)


@META_ARCH_REGISTRY.register()
class SOLOv2(SOLO):
    """SOLOv2 (AdelaiDet's config keys MODEL.SOLOV2): each cell predicts a 1x1 kernel applied to unified
    stride-4 mask features; positives are (instance, cell) pairs."""

    config_node = "MODEL.SOLOV2"

    @classmethod
    def from_config(cls, cfg):
        node = cfg.MODEL.SOLOV2
        backbone = build_backbone(cfg)
        options = _grid_options(node, "MODEL.SOLOV2", SOLOV2_REQUIREMENTS)
        check_norm("MODEL.SOLOV2.NORM", node.NORM, {"MODEL.SOLOV2.MASK_CHANNELS": node.MASK_CHANNELS,
                                                    "MODEL.SOLOV2.NUM_MASKS": node.NUM_MASKS})
        in_channels = _instance_channels(backbone, options["instance_in_features"], "MODEL.SOLOV2.INSTANCE_IN_FEATURES")
        _check_instance_strides(backbone, options["instance_in_features"], options["instance_strides"], "MODEL.SOLOV2")
        mask_in_channels = _instance_channels(backbone, node.MASK_IN_FEATURES, "MODEL.SOLOV2.MASK_IN_FEATURES")
        if in_channels != node.INSTANCE_IN_CHANNELS:
            raise ValueError(f"MODEL.SOLOV2.INSTANCE_IN_CHANNELS={node.INSTANCE_IN_CHANNELS} but the backbone's "
                             f"instance features have {in_channels} channels")
        if mask_in_channels != node.MASK_IN_CHANNELS:
            raise ValueError(f"MODEL.SOLOV2.MASK_IN_CHANNELS={node.MASK_IN_CHANNELS} but the backbone's "
                             f"mask features have {mask_in_channels} channels")
        if node.NUM_MASKS != node.NUM_KERNELS:
            raise ValueError(f"MODEL.SOLOV2.NUM_MASKS ({node.NUM_MASKS}) must equal NUM_KERNELS ({node.NUM_KERNELS}): "
                             "kernels are 1x1 convs over the mask features")
        feature_stride = backbone.output_shape()[node.MASK_IN_FEATURES[0]].stride
        if feature_stride % node.MASK_OUT_STRIDE:
            raise ValueError(f"MODEL.SOLOV2.MASK_OUT_STRIDE must divide the stride {feature_stride} of "
                             f"MASK_IN_FEATURES[0] ({node.MASK_IN_FEATURES[0]}), got {node.MASK_OUT_STRIDE}")
        kernel_branch = KernelBranch(
            in_channels=in_channels, channels=node.INSTANCE_CHANNELS, num_convs=node.NUM_INSTANCE_CONVS,
            norm=node.NORM, num_grids=node.NUM_GRIDS,
            num_kernels=node.NUM_KERNELS + (NUM_QUADRATIC_COORDINATE_TERMS if node.RELATIVE_COORD_TERMS else 0),
            use_coordinates=node.USE_COORD_CONV)
        feature_branch = MaskFeatureBranch(
            in_channels=mask_in_channels, channels=node.MASK_CHANNELS, out_channels=node.NUM_MASKS,
            num_levels=len(node.MASK_IN_FEATURES), norm=node.NORM, use_coordinates=node.USE_COORD_CONV)
        return {
            **options,
            "backbone": backbone,
            "category_branch": CategoryBranch(
                in_channels=in_channels, channels=node.INSTANCE_CHANNELS, num_convs=node.NUM_INSTANCE_CONVS,
                norm=node.NORM, num_classes=node.NUM_CLASSES, num_grids=node.NUM_GRIDS, prior_prob=node.PRIOR_PROB),
            "mask_branch": SOLOv2MaskBranch(kernel_branch=kernel_branch, feature_branch=feature_branch,
                                            mask_in_features=node.MASK_IN_FEATURES,
                                            upsample_factor=feature_stride // node.MASK_OUT_STRIDE,
                                            relative_coord_terms=node.RELATIVE_COORD_TERMS),
            "mask_target_strides": [node.MASK_OUT_STRIDE] * len(node.NUM_GRIDS),
            "deduplicate_cells": False,
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
            "input_format": cfg.INPUT.FORMAT,
            **mbrm_options(cfg, "SOLOv2"),
        }
