from typing import Dict, List

import torch
import torch.nn.functional as F
from torch import nn
from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY, Backbone, build_backbone, build_proposal_generator
from detectron2.layers import cat
from detectron2.structures import Instances
from detectron2.utils.events import get_event_storage

from d2ext.config_checks import check_values
from d2ext.layers import (PixelNormalizationMixin, aligned_bilinear, ensure_gt_masks, padded_bitmasks,
                          postprocess_full_image_masks, postprocess_per_image, register_empty_load_check)

from ..fcos.config import check_fcos_proposal_generator
from ..fcos.head import top_feats_conv
from ..mbrm import freeze_for_mbrm_stage, mbrm_options, mbrm_stage_losses

from .boxinst import add_box_bitmask_targets, boxinst_losses, color_similarity, rgb_to_lab
from .config import BOXINST_REQUIREMENTS, CONDINST_REQUIREMENTS
from .dynamic_mask_head import DynamicMaskHead
from .mask_branch import MaskBranch
from .sampling import sample_positives


def add_bitmask_targets(instances: Instances, padded_height, padded_width, mask_out_stride):
    """Attach ``gt_bitmasks_full`` (M, H, W) over the padded image and ``gt_bitmasks`` (M, H/s, W/s),
    the full masks sampled at pixels ``s * i + s // 2`` (s = ``mask_out_stride``), the dynamic head's
    output positions."""
    gt_masks = ensure_gt_masks(instances, "CondInst").gt_masks
    full = padded_bitmasks(gt_masks, (padded_height, padded_width), instances.gt_boxes.device).float()
    start = mask_out_stride // 2
    instances.gt_bitmasks_full = full
    instances.gt_bitmasks = full[:, start::mask_out_stride, start::mask_out_stride]
    return instances


@META_ARCH_REGISTRY.register()
class CondInst(PixelNormalizationMixin, nn.Module):
    """CondInst (Tian et al., ECCV 2020): FCOS plus, per detection, a tiny mask FCN whose weights a
    controller predicts from the box tower, applied to a shared mask-branch output.

    Inference returns ``Instances`` like Detectron2's Mask R-CNN: ``pred_boxes``, ``scores``,
    ``pred_classes`` and boolean full-image ``pred_masks`` at the original image size.
    With ``boxinst`` settings it trains from boxes only (BoxInst; see ``boxinst.py``).
    """

    @configurable
    def __init__(self, *, backbone: Backbone, proposal_generator: nn.Module, mask_branch: MaskBranch,
                 mask_head: DynamicMaskHead, pixel_mean, pixel_std, max_proposals=-1, topk_proposals_per_im=-1,
                 mask_threshold=0.5, boxinst=None, input_format="BGR", mbrm=None, mbrm_chunk_size=16,
                 mbrm_train_iou=None):
        """
        Args:
            boxinst: None for CondInst; for BoxInst a dict with ``bottom_pixels_removed``,
                ``kernel_size``, ``dilation``, ``warmup_iters``, ``color_thresh`` (MODEL.BOXINST.*).
            input_format: channel order of the input images ("BGR" or "RGB"; BoxInst's colours).
            mbrm: None, or an ``rdsnet_d2.MBRM`` that refines the boxes from the soft masks at inference
                (``MODEL.MBRM.ENABLED``; see ``adet_lite/mbrm.py``).
            mbrm_chunk_size: detections whose full-size soft masks exist at once in post-processing.
            mbrm_train_iou: None, or the MBRM training stage (``MODEL.MBRM.TRAIN``; ``adet_lite/mbrm.py``).
        """
        super().__init__()
        if input_format not in ("BGR", "RGB"):
            raise ValueError(f"CondInst supports INPUT.FORMAT 'BGR' or 'RGB', got {input_format!r}")
        self.backbone = backbone
        self.proposal_generator = proposal_generator
        self.mask_branch = mask_branch
        self.mask_head = mask_head
        self.controller = top_feats_conv(backbone.output_shape(), mask_head.num_params)
        self.max_proposals = max_proposals
        self.topk_proposals_per_im = topk_proposals_per_im
        self.mask_threshold = mask_threshold
        self.boxinst = boxinst
        self.input_format = input_format
        self.mbrm = mbrm
        self.mbrm_chunk_size = mbrm_chunk_size
        self.mbrm_train_iou = mbrm_train_iou
        self.register_pixel_stats(pixel_mean, pixel_std)
        register_empty_load_check(self)
        freeze_for_mbrm_stage(self)

    @classmethod
    def from_config(cls, cfg):
        if cfg.MODEL.CONDINST.BOTTOM_PIXELS_REMOVED != -1:
            raise ValueError("MODEL.CONDINST.BOTTOM_PIXELS_REMOVED is not used by adet_lite: keep -1 "
                             "(BoxInst reads MODEL.BOXINST.BOTTOM_PIXELS_REMOVED)")
        check_values(cfg.MODEL.CONDINST, "MODEL.CONDINST", CONDINST_REQUIREMENTS)
        boxinst = None
        if cfg.MODEL.BOXINST.ENABLED:
            check_values(cfg.MODEL.BOXINST, "MODEL.BOXINST", BOXINST_REQUIREMENTS)
            pairwise = cfg.MODEL.BOXINST.PAIRWISE
            boxinst = {"bottom_pixels_removed": cfg.MODEL.BOXINST.BOTTOM_PIXELS_REMOVED, "kernel_size": pairwise.SIZE,
                       "dilation": pairwise.DILATION, "warmup_iters": pairwise.WARMUP_ITERS,
                       "color_thresh": pairwise.COLOR_THRESH}
        check_fcos_proposal_generator(cfg, "CondInst")
        backbone = build_backbone(cfg)
        output_shape = backbone.output_shape()
        mask_branch = MaskBranch(cfg, output_shape)
        return {
            "backbone": backbone,
            "proposal_generator": build_proposal_generator(cfg, output_shape),
            "mask_branch": mask_branch,
            "mask_head": DynamicMaskHead(cfg, cfg.MODEL.CONDINST.MASK_BRANCH.OUT_CHANNELS),
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
            "max_proposals": cfg.MODEL.CONDINST.MAX_PROPOSALS,
            "topk_proposals_per_im": cfg.MODEL.CONDINST.TOPK_PROPOSALS_PER_IM,
            "boxinst": boxinst,
            "input_format": cfg.INPUT.FORMAT,
            **mbrm_options(cfg, "CondInst"),
        }

    def forward(self, batched_inputs: List[Dict]):
        """Detectron2's meta-architecture interface: losses in training, else per image
        ``{"instances": Instances}`` at the original size (``height`` / ``width`` of the inputs)."""
        if not self.training:
            return self.inference(batched_inputs)
        if self.mbrm_train_iou is not None:
            return mbrm_stage_losses(self, batched_inputs)
        images = self.preprocess_image(batched_inputs)
        features = self.backbone(images.tensor)
        padded_height, padded_width = images.tensor.shape[-2:]
        if any("instances" not in x for x in batched_inputs):
            raise ValueError("CondInst in training mode needs 'instances' in every input")
        add_targets = add_bitmask_targets if self.boxinst is None else add_box_bitmask_targets
        gt_instances = [add_targets(x["instances"].to(self.device), padded_height, padded_width,
                                    self.mask_head.mask_out_stride) for x in batched_inputs]
        mask_feats, losses = self.mask_branch(features, gt_instances)
        predictions = self.proposal_generator.predict(features, self.controller)
        fcos_losses, positives = self.proposal_generator.losses(predictions, gt_instances)
        losses.update(fcos_losses)
        positives = sample_positives(positives, self.max_proposals, self.topk_proposals_per_im)
        positives.mask_head_params = positives.top_feats
        if self.boxinst is None:
            losses.update(self.mask_head.loss(mask_feats, self.mask_branch.out_stride, positives, gt_instances))
        else:
            similarity = self.color_similarities(batched_inputs, padded_height, padded_width)
            losses.update(self.boxinst_mask_losses(mask_feats, positives, gt_instances, similarity))
        return losses

    def inference(self, batched_inputs: List[Dict], do_postprocess=True):
        """As ``GeneralizedRCNN.inference``: per image ``{"instances": Instances}`` at the original size,
        or without ``do_postprocess`` the ``Instances`` at the input size with soft ``pred_masks``
        (N, H / s, W / s) over the padded input at the mask output stride s (what export traces; see
        :meth:`postprocess`)."""
        images = self.preprocess_image(batched_inputs)
        features = self.backbone(images.tensor)
        mask_feats, _ = self.mask_branch(features)
        predictions = self.proposal_generator.predict(features, self.controller)
        detections = self.proposal_generator.inference(predictions, images.image_sizes)
        results = self.predict_masks(mask_feats, detections)
        if not do_postprocess:
            return results
        return postprocess_per_image(results, batched_inputs, images.image_sizes, self.postprocess)

    def postprocess(self, results: Instances, height, width):
        """Input-size ``Instances`` -> boolean masks and boxes at the original ``height`` x ``width``; with
        MBRM, the boxes refined from the soft masks at that size."""
        return postprocess_full_image_masks(results, height, width, self.mask_threshold,
                                            refine_boxes=self.mbrm, chunk_size=self.mbrm_chunk_size,
                                            input_size_masks=self.input_size_masks)

    def input_size_masks(self, masks, image_size):
        """(N, H / s, W / s) soft masks over the padded input at the mask output stride s -> (N, h, w) over
        the input image of ``image_size``: upsampled to the padded input as AdelaiDet does, then cropped.
        Post-processing calls it on a few detections at a time, so that the full-size masks of all
        detections are never in memory together."""
        upsampled = aligned_bilinear(masks[:, None], self.mask_head.mask_out_stride)
        return upsampled[:, 0, : image_size[0], : image_size[1]]

    def color_similarities(self, batched_inputs, padded_height, padded_width):
        """BoxInst: (B, K, H/s, W/s) colour similarity (L*a*b*) of every stride-s pixel of each padded
        image to its K dilated neighbours; zero for neighbours in the padding or in the bottom rows
        left out by MODEL.BOXINST.BOTTOM_PIXELS_REMOVED (given at the original resolution)."""
        stride = self.mask_head.mask_out_stride
        start = stride // 2
        similarities = []
        for x in batched_inputs:
            image = x["image"].to(self.device).float()
            height, width = image.shape[-2:]
            image = F.pad(image, (0, padded_width - width, 0, padded_height - height))
            if self.input_format == "BGR":
                image = image.flip(0)
            lab = rgb_to_lab(F.avg_pool2d(image[None], kernel_size=stride, stride=stride))[0]
            valid = torch.zeros((padded_height, padded_width), device=self.device)
            removed = int(self.boxinst["bottom_pixels_removed"] * height / x.get("height", height))
            valid[: max(height - removed, 0), :width] = 1.0
            similarities.append(color_similarity(lab, valid[start::stride, start::stride],
                                                 self.boxinst["kernel_size"], self.boxinst["dilation"]))
        return torch.stack(similarities)

    def boxinst_mask_losses(self, mask_feats, positives: Instances, gt_instances: List[Instances], similarity):
        """BoxInst's projection and pairwise losses of the sampled positives (see ``boxinst_losses``)."""
        if len(positives) == 0:
            # No positive: zeros that keep the mask branch and the controller in the graph (DDP).
            zero = mask_feats.sum() * 0.0 + positives.mask_head_params.sum() * 0.0
            return {"loss_prj": zero, "loss_pairwise": zero}
        logits = self.mask_head(mask_feats, self.mask_branch.out_stride, positives)
        box_masks = cat([x.gt_bitmasks for x in gt_instances])[positives.gt_inds][:, None]
        warmup_iters = self.boxinst["warmup_iters"]  # 0: no warm-up
        warmup_factor = min((get_event_storage().iter + 1) / warmup_iters, 1.0) if warmup_iters else 1.0
        return boxinst_losses(logits, box_masks, similarity[positives.im_inds],
                              kernel_size=self.boxinst["kernel_size"], dilation=self.boxinst["dilation"],
                              color_thresh=self.boxinst["color_thresh"], warmup_factor=warmup_factor)

    def predict_masks(self, mask_feats, detections: List[Instances]):
        """Run the dynamic head on the detections of all images at once; per image, the detections get
        soft ``pred_masks`` (N, H / s, W / s) over the padded input at the mask output stride s
        (:meth:`input_size_masks` brings them to the input image)."""
        batch_detections = Instances((0, 0))  # the detections of all images (their sizes differ)
        batch_detections.im_inds = torch.cat([
            torch.full((len(det),), i, dtype=torch.int64, device=self.device) for i, det in enumerate(detections)])
        for field in ("locations", "fpn_levels"):
            batch_detections.set(field, torch.cat([det.get(field) for det in detections]))
        batch_detections.mask_head_params = torch.cat([det.top_feat for det in detections])
        mask_probs = self.mask_head(mask_feats, self.mask_branch.out_stride, batch_detections).sigmoid()
        for det, probs in zip(detections, mask_probs.split([len(d) for d in detections])):
            det.remove("top_feat")
            det.pred_masks = probs[:, 0]
        return detections
