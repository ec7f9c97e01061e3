"""The mask side of RDSNet, shared by its object streams (RetinaNet's anchors in ``RDSNet``, FCOS's
locations in ``RDSNetFCOS``): mask targets of sampled positives, the correlation + OHEM mask loss, the
masks of the detections at test time (boxes refined by MBRM when it is on), and the MBRM training stage."""
from typing import Dict, List

import torch
from detectron2.layers import cat
from detectron2.structures import Boxes, Instances
from torch.nn import functional as F

from d2ext.config_checks import check_norm, check_values
from d2ext.layers import ensure_gt_masks, padded_bitmasks, postprocess_full_image_masks

from .config import RDSNET_REQUIREMENTS
from .correlation import box_coordinate_logits, correlate, object_rep_length
from .cropping import crop_axes, crop_masks, expanded_crop_boxes
from .mask_loss import IGNORE, ohem_mask_loss
from .mbrm import MBRM, cat_profiles
from .mbrm_postprocess import build_mbrm, mbrm_train_iou
from .mbrm_training import freeze_for_mbrm_stage, frozen_detector_mbrm_losses
from .pixel_stream import PixelStream


class RDSNetMasks:
    """Mix into a meta-architecture (before ``nn.Module`` or its base) that implements
    ``training_losses(batched_inputs, gt_instances) -> dict`` (its object stream's losses and
    :meth:`mask_loss`) and ``run_detection(batched_inputs) -> (images, detections, pixel_reps)``: per image
    ``Instances`` at the input size with ``pred_boxes``, ``scores``, ``pred_classes`` and ``object_reps``
    (N, 2, L: ``object_rep_length``), and the batch's (B, d, H / mask_stride, W / mask_stride) pixel
    representations.

    Call ``init_masks(**mask_options(cfg, backbone_shape))`` in ``__init__``.
    """

    @staticmethod
    def mask_options(cfg, backbone_shape) -> Dict:
        """The constructor arguments of the mask side, from ``MODEL.RDSNET.*`` and ``MODEL.MBRM.*``."""
        if not cfg.MODEL.MASK_ON:
            raise ValueError("RDSNet trains on instance masks: set MODEL.MASK_ON True (the data mapper "
                             "loads masks only then)")
        check_values(cfg.MODEL.RDSNET, "MODEL.RDSNET", RDSNET_REQUIREMENTS)
        check_norm("MODEL.RDSNET.PIXEL_NORM", cfg.MODEL.RDSNET.PIXEL_NORM,
                   {"MODEL.RDSNET.PIXEL_CONV_DIM": cfg.MODEL.RDSNET.PIXEL_CONV_DIM})
        return dict(
            pixel_stream=PixelStream(cfg, backbone_shape),
            mask_stride=backbone_shape[cfg.MODEL.RDSNET.PIXEL_IN_FEATURES[0]].stride // 2,
            rep_dim=cfg.MODEL.RDSNET.REP_DIM,
            box_coord_terms=cfg.MODEL.RDSNET.BOX_COORD_TERMS,
            mask_samples_per_image=cfg.MODEL.RDSNET.MASK_SAMPLES_PER_IMAGE,
            mask_min_area=cfg.MODEL.RDSNET.MASK_MIN_AREA,
            train_crop_expand=cfg.MODEL.RDSNET.TRAIN_CROP_EXPAND,
            ohem_neg_pos_ratio=cfg.MODEL.RDSNET.OHEM_NEG_POS_RATIO,
            mask_loss_weight=cfg.MODEL.RDSNET.MASK_LOSS_WEIGHT,
            test_crop_expand=cfg.MODEL.RDSNET.TEST_CROP_EXPAND,
            mask_threshold=cfg.MODEL.RDSNET.MASK_THRESHOLD,
            mask_chunk_size=cfg.MODEL.RDSNET.MASK_CHUNK_SIZE,
            mbrm=build_mbrm(cfg, "RDSNet"),
            mbrm_train_iou=mbrm_train_iou(cfg),
        )

    def init_masks(self, *, pixel_stream, mask_stride, rep_dim, box_coord_terms=False, mask_samples_per_image=100,
                   mask_min_area=100, train_crop_expand=0.25, ohem_neg_pos_ratio=1.0, mask_loss_weight=1.0,
                   test_crop_expand=0.1, mask_threshold=0.4, mask_chunk_size=16, mbrm=None,
                   mbrm_train_iou=None):
        """
        Args:
            pixel_stream: a :class:`PixelStream`, producing (B, d, H / mask_stride, W / mask_stride).
            rep_dim: d.
            box_coord_terms: object representations end with 4 more values per slot, the coefficients of
                :func:`box_coordinate_logits` (``MODEL.RDSNET.BOX_COORD_TERMS``).
            mask_samples_per_image, mask_min_area: positives per image whose masks are trained, among
                those whose GT mask has more than ``mask_min_area`` pixels.
            train_crop_expand, test_crop_expand: crop expansion p in training / at test.
            mbrm: an :class:`MBRM` that refines the boxes at inference, or None.
            mbrm_train_iou: None, or the MBRM training stage (everything else frozen, only ``loss_mbrm``:
                :func:`frozen_detector_mbrm_losses`).
        Call after ``nn.Module.__init__`` and after every other submodule is set (the MBRM stage
        freezes the parameters present then).
        """
        if mask_chunk_size < 1:
            raise ValueError(f"MODEL.RDSNET.MASK_CHUNK_SIZE must be >= 1, got {mask_chunk_size}")
        if not 0.0 <= mask_threshold <= 1.0:
            raise ValueError(f"MODEL.RDSNET.MASK_THRESHOLD must be in [0, 1], got {mask_threshold}")
        self.pixel_stream = pixel_stream
        self.mask_stride = mask_stride
        self.rep_dim = rep_dim
        self.box_coord_terms = box_coord_terms
        # Values per slot of the object representations the object stream predicts.
        self.object_rep_length = object_rep_length(rep_dim, box_coord_terms)
        self.mask_samples_per_image = mask_samples_per_image
        self.mask_min_area = mask_min_area
        self.train_crop_expand = train_crop_expand
        self.ohem_neg_pos_ratio = ohem_neg_pos_ratio
        self.mask_loss_weight = mask_loss_weight
        self.test_crop_expand = test_crop_expand
        self.mask_threshold = mask_threshold
        self.mask_chunk_size = mask_chunk_size
        self.mbrm = mbrm
        self.mbrm_train_iou = mbrm_train_iou
        freeze_for_mbrm_stage(self)

    def forward(self, batched_inputs: List[Dict[str, torch.Tensor]]):
        """Detectron2's model contract: losses in training, ``[{"instances": Instances}]`` otherwise."""
        if not self.training:
            return self.inference(batched_inputs)
        if self.mbrm_train_iou is not None:
            return frozen_detector_mbrm_losses(self, batched_inputs, self.mbrm_train_iou)
        if any("instances" not in x for x in batched_inputs):
            raise ValueError(f"{type(self).__name__}: training inputs need 'instances' (annotations)")
        gt_instances = [x["instances"].to(self.device) for x in batched_inputs]
        return self.training_losses(batched_inputs, gt_instances)

    # ------------------------------------------------------------------ training
    def mask_loss(self, padded_size, pixel_reps, positive_images, positive_gt, positive_reps, gt_instances):
        """``loss_mask`` of a batch: sampled positives' masks (correlation of their object representations
        with their image's pixel representations) against their GT masks, with OHEM in the crops.

        Args:
            padded_size: (H, W) of the padded input batch.
            pixel_reps: (B, d, H / mask_stride, W / mask_stride).
            positive_images, positive_gt: (K,) each positive's image and GT index in that image.
            positive_reps: (K, 2L) each positive's object representation (L = ``object_rep_length``).
        Returns:
            the weighted loss (0 when no positive trains a mask, still connected to both streams).
        """
        selected, targets, boxes = self.mask_targets(padded_size, pixel_reps.shape[-2:], positive_images,
                                                     positive_gt, gt_instances)
        if targets.shape[0] == 0:
            return (pixel_reps.sum() + positive_reps.sum()) * 0.0
        object_reps = positive_reps[selected].view(-1, 2, self.object_rep_length)
        logits = self.mask_logits(pixel_reps, object_reps, positive_images[selected], boxes)
        return self.mask_loss_weight * ohem_mask_loss(logits, targets, self.ohem_neg_pos_ratio)

    @torch.no_grad()
    def mask_targets(self, padded_size, mask_size, positive_images, positive_gt, gt_instances):
        """Sample the positives whose masks are trained (per image, among those whose GT mask is larger
        than ``mask_min_area``, at most ``mask_samples_per_image`` at random) and build their targets.

        Returns:
            selected (M,) indices into the positives, targets (M, h, w) long at the mask stride (1 / 0
            inside the crop of the expanded GT box, -1 (ignored) outside), and their GT boxes (M, 4) in
            pixels of the mask stride.
        """
        selected, targets, boxes = [], [], []
        for i, gt in enumerate(gt_instances):
            positives = torch.nonzero(positive_images == i).squeeze(1)
            if positives.numel() == 0:
                continue
            gt_small, areas = self._gt_masks_at_mask_stride(gt, padded_size, mask_size)
            positives = positives[areas[positive_gt[positives]] > self.mask_min_area]
            positives = positives[torch.randperm(positives.numel(), device=positives.device)
                                  [: self.mask_samples_per_image]]
            gt_index = positive_gt[positives]
            gt_boxes = gt.gt_boxes.tensor[gt_index] / self.mask_stride
            crops = expanded_crop_boxes(gt_boxes, self.train_crop_expand, mask_size[0], mask_size[1])
            target = gt_small[gt_index].long()
            target[~crop_masks(crops, mask_size[0], mask_size[1])] = IGNORE
            targets.append(target)
            selected.append(positives)
            boxes.append(gt_boxes)
        if not targets:
            device = positive_images.device
            return (torch.zeros(0, dtype=torch.long, device=device),
                    torch.zeros((0, *mask_size), dtype=torch.long, device=device), torch.zeros(0, 4, device=device))
        return cat(selected), cat(targets), cat(boxes)

    def mask_logits(self, pixel_reps, object_reps, image_indices, boxes):
        """(N, 2, h, w) mask logits at the mask stride: :func:`correlate` of the representations' first d
        values per slot, plus :func:`box_coordinate_logits` of the rest when ``box_coord_terms``.

        Args:
            pixel_reps: (B, d, h, w); object_reps: (N, 2, L); image_indices: (N,), or None for a batch of one;
            boxes: (N, 4) each instance's box in pixels of the mask stride (read only with the terms).
        """
        logits = correlate(pixel_reps, object_reps[..., : self.rep_dim], image_indices)
        if self.box_coord_terms:
            logits = logits + box_coordinate_logits(object_reps[..., self.rep_dim:], boxes, *logits.shape[-2:])
        return logits

    def _gt_masks_at_mask_stride(self, gt, padded_size, mask_size, chunk_size=16):
        """(G, h, w) bool at the mask stride and the GT pixel areas (G,) at input resolution. The float copies
        that the resizing needs are made ``chunk_size`` masks at a time (a crowded image's full-size masks in
        float would take hundreds of MB)."""
        padded = padded_bitmasks(ensure_gt_masks(gt, "RDSNet").gt_masks, padded_size, gt.gt_boxes.device)
        small = torch.zeros((padded.shape[0], *mask_size), dtype=torch.bool, device=padded.device)
        for start in range(0, padded.shape[0], chunk_size):
            chunk = padded[start:start + chunk_size].float()
            small[start:start + chunk_size] = F.interpolate(chunk[None], size=mask_size, mode="bilinear",
                                                            align_corners=False)[0] > 0.5
        return small, padded.flatten(1).sum(dim=1)

    # ------------------------------------------------------------------ inference
    def inference(self, batched_inputs: List[Dict[str, torch.Tensor]], do_postprocess=True):
        """As ``GeneralizedRCNN.inference``: per image ``{"instances": Instances}`` with masks formed at
        the original size (the official resizing, see :meth:`instance_masks`). Without
        ``do_postprocess`` (what export traces): the ``Instances`` with masks formed at the input size;
        :meth:`postprocess` then resizes those binary masks, which equals the official resizing only
        when the input is not resized."""
        images, detections, pixel_reps = self.run_detection(batched_inputs)
        outputs = []
        for i, image_detections in enumerate(detections):
            output_size = image_detections.image_size
            if do_postprocess:
                output_size = (int(batched_inputs[i].get("height", output_size[0])),
                               int(batched_inputs[i].get("width", output_size[1])))
            instances = self.instance_masks(image_detections, pixel_reps[i], images.tensor.shape[-2:], output_size)
            outputs.append({"instances": instances} if do_postprocess else instances)
        return outputs

    def postprocess(self, results: Instances, height, width):
        """Input-size ``Instances`` (``inference(..., do_postprocess=False)``) -> the original size."""
        return postprocess_full_image_masks(results, height, width)

    def instance_masks(self, detections, pixel_rep, padded_size, output_size):
        """Masks of one image's detections at ``output_size``, in chunks of ``mask_chunk_size``
        detections so that peak memory does not grow with the number of detections.

        Logits are upsampled before the softmax (to the padded input, align_corners=False; sliced to
        the image; to the output size, align_corners=True). The 2-way softmax equals the sigmoid of
        the foreground-minus-background logit, and interpolation is linear, so one channel is upsampled.
        Returns ``Instances`` at ``output_size`` (boxes rescaled and clipped, empty boxes dropped, masks
        binarised at ``mask_threshold``, boxes refined by the model's MBRM if it has one).
        """
        input_size = detections.image_size
        out_h, out_w = output_size
        # Boxes only (rescaled, clipped, empty ones dropped): the shared helper would need every
        # detection's soft mask at once, and the official mask resizing differs (see above).
        detections = postprocess_full_image_masks(detections, out_h, out_w)
        boxes = detections.pred_boxes
        crops = expanded_crop_boxes(boxes.tensor, self.test_crop_expand, out_h, out_w)
        crop_rows, crop_cols = crop_axes(crops, out_h, out_w)  # each chunk's crop masks are their outer product
        mask_stride_boxes = None
        if self.box_coord_terms:  # the boxes back at the input size, in pixels of the mask stride
            to_input = boxes.tensor.new_tensor([input_size[1] / out_w, input_size[0] / out_h] * 2)
            mask_stride_boxes = boxes.tensor * (to_input / self.mask_stride)
        # All detections' logits at the mask stride at once (one correlation, not one per chunk: at batch 1 on a
        # GPU the time goes to kernel launches; 100 detections at 800 x 1333 hold 27 MB, less than one chunk's
        # full-size masks); only the full-size masks are made a chunk at a time.
        logits = self.mask_logits(pixel_rep[None], detections.object_reps, None, mask_stride_boxes)
        all_fg_minus_bg = logits[:, 1:] - logits[:, :1]
        del logits  # twice the size of the difference: not kept through the chunks
        binary, profile_chunks = [], []
        if torch.jit.is_tracing():  # one chunk: a loop over the detections would unroll for the traced count
            chunks = [slice(None)]
        else:
            chunks = [slice(start, start + self.mask_chunk_size)
                      for start in range(0, len(detections), self.mask_chunk_size)]
        for chunk in chunks:
            fg_minus_bg = F.interpolate(all_fg_minus_bg[chunk], size=tuple(padded_size), mode="bilinear",
                                        align_corners=False)
            fg_minus_bg = fg_minus_bg[:, :, : input_size[0], : input_size[1]]
            if tuple(input_size) != (out_h, out_w):
                fg_minus_bg = F.interpolate(fg_minus_bg, size=(out_h, out_w), mode="bilinear", align_corners=True)
            soft = fg_minus_bg[:, 0].sigmoid() * (crop_rows[chunk, :, None] & crop_cols[chunk, None, :])
            binary.append(soft > self.mask_threshold)
            if self.mbrm is not None:
                profile_chunks.append(MBRM.profiles(soft))
        device = pixel_rep.device
        masks = cat(binary) if binary else torch.zeros((0, out_h, out_w), dtype=torch.bool, device=device)
        if self.mbrm is not None:
            profiles = cat_profiles(profile_chunks, output_size, device)
            boxes = Boxes(self.mbrm.refine_detections(profiles[0], profiles[1], boxes.tensor))
        return Instances(output_size, pred_boxes=boxes, scores=detections.scores,
                         pred_classes=detections.pred_classes, pred_masks=masks)
