"""MBRM as a post-processor for any detector that predicts boxes and soft instance masks: the per-image
refinement, its cheaper form for RoI masks pasted into boxes (Mask R-CNN, BlendMask), the builder that
the models call when ``MODEL.MBRM.ENABLED`` or ``TRAIN`` is set, and the Mask R-CNN meta-architecture
that uses it (``MODEL.META_ARCHITECTURE "GeneralizedRCNNWithMBRM"``).

Models with full-image soft masks (CondInst, SOLO) pass their ``MBRM`` as the ``refine_boxes`` hook of
``d2ext.layers.postprocess_full_image_masks``; models with RoI masks call
:func:`detector_postprocess_with_mbrm` instead of Detectron2's ``detector_postprocess``.
"""
import functools
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY, GeneralizedRCNN
from detectron2.modeling.postprocessing import detector_postprocess
from detectron2.structures import Boxes, Instances

from d2ext.layers import check_input_images, postprocess_per_image, register_empty_load_check

from .mbrm import MBRM, cat_profiles
from .mbrm_training import freeze_for_mbrm_stage, frozen_detector_mbrm_losses


def build_mbrm(cfg, model_name):
    """``MBRM(cfg)`` for a model that refines its boxes with it at inference (``MODEL.MBRM.ENABLED``) or
    trains it in the MBRM stage (``MODEL.MBRM.TRAIN``, which then also refines), or None when both are off.

    Outside the stage the MBRM is frozen (``requires_grad`` False): training the model with the switch on
    must neither leave parameters without gradients (distributed training) nor decay them. Its weights
    still load from a checkpoint (``mbrm.*``).

    Args:
        model_name: for the error messages.
    """
    node = cfg.MODEL.MBRM
    if not (node.ENABLED or node.TRAIN):
        return None
    if not cfg.MODEL.MASK_ON:
        raise ValueError(f"MODEL.MBRM.ENABLED / TRAIN: MBRM refines {model_name}'s boxes from its predicted masks: "
                         "set MODEL.MASK_ON True")
    return MBRM(cfg).requires_grad_(bool(node.TRAIN))


def mbrm_train_iou(cfg):
    """``MODEL.MBRM.TRAIN_IOU`` in the MBRM training stage (``MODEL.MBRM.TRAIN``), else None: the models'
    ``mbrm_train_iou`` argument."""
    return cfg.MODEL.MBRM.TRAIN_IOU if cfg.MODEL.MBRM.TRAIN else None


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
    chunks = [soft_masks] if isinstance(soft_masks, torch.Tensor) else soft_masks
    profile_chunks = []
    for chunk in chunks:
        if tuple(chunk.shape[-2:]) != tuple(instances.image_size):
            raise ValueError(f"refine_instances_with_mbrm: soft masks of size {tuple(chunk.shape[-2:])} "
                             f"for instances of image size {tuple(instances.image_size)}")
        profile_chunks.append(MBRM.profiles(chunk))
    x_profiles, y_profiles = cat_profiles(profile_chunks, instances.image_size, instances.pred_boxes.device)
    return _with_refined_boxes(mbrm, instances, x_profiles, y_profiles)


def _with_refined_boxes(mbrm, instances, x_profiles, y_profiles):
    refined = Instances(instances.image_size, **instances.get_fields())
    refined.pred_boxes = Boxes(mbrm.refine_detections(x_profiles, y_profiles, instances.pred_boxes.tensor))
    return refined


def detector_postprocess_with_mbrm(mbrm, results: Instances, height, width, mask_threshold=0.5, chunk_size=16):
    """Detectron2's ``detector_postprocess`` of detections with RoI masks (Mask R-CNN, BlendMask), whose
    boxes are then refined by MBRM from the soft RoI masks pasted into those boxes.

    Masks, scores and classes are exactly ``detector_postprocess``'s (binary masks pasted at
    ``mask_threshold``); ``results`` is not modified.

    Args:
        results: ``Instances`` at the input resolution with ``pred_boxes`` and ``pred_masks``
            (N, 1, M, M) mask probabilities of the boxes.
        height, width: the output size.
        chunk_size: masks pasted at once (:func:`pasted_mask_profiles`) on devices other than the CPU.
            On the CPU one at a time, each on its own window (no padding to a chunk's largest window),
            which is fastest there, as in Detectron2's own pasting; the profiles are the same either way.
    """
    # detector_postprocess replaces pred_masks by binary pasted masks (and drops empty boxes): keep the
    # soft RoI masks in a field that it indexes along.
    raw = Instances(results.image_size, **results.get_fields())
    raw.roi_mask_probs = raw.pred_masks[:, 0]
    instances = detector_postprocess(raw, height, width, mask_threshold)
    boxes = instances.pred_boxes.tensor
    x_profiles, y_profiles = pasted_mask_profiles(instances.roi_mask_probs, boxes, instances.image_size,
                                                  1 if boxes.device.type == "cpu" else chunk_size)
    instances.remove("roi_mask_probs")
    return _with_refined_boxes(mbrm, instances, x_profiles, y_profiles)


def pasted_mask_profiles(roi_masks, boxes, image_size, chunk_size=16):
    """``MBRM.profiles`` of RoI mask probabilities pasted into the image, computed on each mask's support.

    The pasted masks are Detectron2's soft pasting (``paste_masks_in_image`` with ``threshold=-1``, as it
    computes them on GPU: bilinear ``grid_sample`` of the M x M mask over its box, zero padding, values
    quantised to steps of 1/255, far below MBRM's sensitivity). Such a mask is exactly 0 at pixels whose
    centre lies more than half a RoI cell outside the box, and zeros do not change the max-projections of
    masks >= 0; so each mask is sampled only on a window covering its box grown by half a cell (plus 1 px
    against rounding), and the profiles equal those of the full-image masks (tested) at the cost of the
    boxes' areas instead of N image areas. (On CPU, Detectron2's own pasting samples each mask on its box
    grown by 1 px only, which cuts the fringe of boxes wider than 2M px; this does not.)

    Args:
        roi_masks: (N, M, M) probabilities in [0, 1]; boxes: (N, 4) non-empty, in the frame of
            ``image_size`` (H, W).
        chunk_size: masks sampled at once, all on windows of the chunk's largest size; chunks are formed in
            order of window area so that their windows are alike.
    Returns:
        x (N, W), y (N, H) float profiles.
    """
    if chunk_size < 1:
        raise ValueError(f"pasted_mask_profiles: chunk_size must be >= 1, got {chunk_size}")
    height, width = (int(s) for s in image_size)
    num = roi_masks.shape[0]
    x_profiles = roi_masks.new_zeros((num, width), dtype=torch.float32)
    y_profiles = roi_masks.new_zeros((num, height), dtype=torch.float32)
    if num == 0:
        return x_profiles, y_profiles
    boxes = boxes.float()
    x_start, x_end = _support_window(boxes[:, 0], boxes[:, 2], roi_masks.shape[-1], width)
    y_start, y_end = _support_window(boxes[:, 1], boxes[:, 3], roi_masks.shape[-2], height)
    sizes = torch.stack([x_end - x_start, y_end - y_start], dim=1).int().tolist()  # the one host sync
    by_area = sorted(range(num), key=lambda i: -sizes[i][0] * sizes[i][1])
    for start in range(0, num, chunk_size):
        chunk = by_area[start: start + chunk_size]
        index = torch.as_tensor(chunk, device=boxes.device)
        columns = _window_pixels(x_start[index], max(sizes[i][0] for i in chunk), width)
        rows = _window_pixels(y_start[index], max(sizes[i][1] for i in chunk), height)
        pasted = _paste_on_windows(roi_masks[index], boxes[index], columns, rows)
        x_profiles[index[:, None], columns.long()] = pasted.amax(dim=1)
        y_profiles[index[:, None], rows.long()] = pasted.amax(dim=2)
    # The pasting's quantisation x -> floor(255 x) / 255 is monotone, so it commutes with the max: applied
    # to the profiles, not to every pixel.
    return _quantise_as_pasted(x_profiles), _quantise_as_pasted(y_profiles)


def _support_window(lo, hi, mask_size, length):
    """Along one axis: the pixels [start, end) where masks pasted on [lo, hi) can be non-zero.
    ``grid_sample`` with zero padding reads 0 beyond half a cell ((hi - lo) / (2 M)) outside the box;
    1 px more against rounding; clipped to the image [0, length). (n,) float each."""
    half_cell = (hi - lo) / (2 * mask_size)
    start = ((lo - half_cell).floor() - 1).clamp(0, length)
    end = ((hi + half_cell).ceil() + 1).clamp(0, length)
    return start, end


def _window_pixels(start, size, length):
    """(n, size) float pixel positions of windows of ``size`` pixels from ``start`` (n,), in [0, length).
    A window that would cross the image's far end is moved back (it still covers its support), so that no
    pixel outside the image enters a max-projection."""
    start = start.clamp(max=length - size)
    return start[:, None] + torch.arange(size, device=start.device, dtype=start.dtype)


def _paste_on_windows(roi_masks, boxes, columns, rows):
    """Detectron2's ``_do_paste_mask`` evaluated at the given pixels of each mask: (n, M, M), (n, 4),
    columns (n, w), rows (n, h) -> (n, h, w). The sampling coordinates are computed with its operations,
    in its order, so that every value equals the full-image paste's at that pixel."""
    x0, y0, x1, y1 = torch.split(boxes, 1, dim=1)  # each (n, 1)
    grid_x = (columns + 0.5 - x0) / (x1 - x0) * 2 - 1  # (n, w)
    grid_y = (rows + 0.5 - y0) / (y1 - y0) * 2 - 1  # (n, h)
    n, h, w = roi_masks.shape[0], grid_y.shape[1], grid_x.shape[1]
    grid = torch.stack([grid_x[:, None, :].expand(n, h, w), grid_y[:, :, None].expand(n, h, w)], dim=3)
    return F.grid_sample(roi_masks[:, None].float(), grid, align_corners=False)[:, 0]


def _quantise_as_pasted(values):
    """What ``paste_masks_in_image(threshold=-1)`` keeps of values in [0, 1]: (x * 255) as uint8, / 255."""
    return (values * 255).to(dtype=torch.uint8).float() / 255


@META_ARCH_REGISTRY.register()
class GeneralizedRCNNWithMBRM(GeneralizedRCNN):
    """Detectron2's ``GeneralizedRCNN`` (Mask R-CNN) whose boxes, with ``mbrm`` set, are refined by MBRM
    from the soft pasted masks after the usual post-processing. Outputs are otherwise identical
    (same masks, scores, classes); without ``mbrm`` the model is exactly ``GeneralizedRCNN``.

    Soft masks exist only inside the box they are pasted into (plus the bilinear fringe of half a RoI
    cell), so MBRM can move a side outwards by at most about that fringe; it mostly tightens boxes.
    """

    @configurable
    def __init__(self, *, mbrm: Optional[MBRM] = None, mask_chunk_size: int = 16,
                 mbrm_train_iou: Optional[float] = None, **kwargs):
        """
        Args (besides GeneralizedRCNN's):
            mbrm: an :class:`MBRM`, or None (no refinement).
            mask_chunk_size: detections whose masks are pasted at once (see :func:`pasted_mask_profiles`).
            mbrm_train_iou: None, or the MBRM training stage (``MODEL.MBRM.TRAIN``): only ``mbrm`` trains, on
                the detections overlapping a GT box by this IoU (:func:`frozen_detector_mbrm_losses`).
        """
        super().__init__(**kwargs)
        if mask_chunk_size < 1:
            raise ValueError(f"mask_chunk_size must be >= 1, got {mask_chunk_size}")
        self.mbrm = mbrm
        self.mask_chunk_size = mask_chunk_size
        self.mbrm_train_iou = mbrm_train_iou
        freeze_for_mbrm_stage(self)
        register_empty_load_check(self)

    @classmethod
    def from_config(cls, cfg):
        mbrm = build_mbrm(cfg, "Mask R-CNN")
        ret = super().from_config(cfg)
        ret.update(mbrm=mbrm, mask_chunk_size=cfg.MODEL.MBRM.MASK_CHUNK_SIZE, mbrm_train_iou=mbrm_train_iou(cfg))
        return ret

    def forward(self, batched_inputs: List[Dict[str, torch.Tensor]]):
        """GeneralizedRCNN's; in the MBRM training stage only ``loss_mbrm``."""
        if self.training and self.mbrm_train_iou is not None:
            return frozen_detector_mbrm_losses(self, batched_inputs, self.mbrm_train_iou)
        return super().forward(batched_inputs)

    def preprocess_image(self, batched_inputs: List[Dict[str, torch.Tensor]]):
        """GeneralizedRCNN's, after checking that every image has channels and pixels (GeneralizedRCNN
        would pass an empty image on and fail rescaling its detections)."""
        check_input_images(batched_inputs, len(self.pixel_mean))
        return super().preprocess_image(batched_inputs)

    def inference(self, batched_inputs: List[Dict[str, torch.Tensor]],
                  detected_instances: Optional[List[Instances]] = None, do_postprocess: bool = True):
        """GeneralizedRCNN's inference; with ``do_postprocess`` and MBRM, the boxes are refined. Raw
        outputs (``do_postprocess=False``) hold RoI masks, not image masks, and are returned as they are."""
        if self.mbrm is None or not do_postprocess:
            return super().inference(batched_inputs, detected_instances, do_postprocess)
        results = super().inference(batched_inputs, detected_instances, do_postprocess=False)
        postprocess = functools.partial(detector_postprocess_with_mbrm, self.mbrm, chunk_size=self.mask_chunk_size)
        return postprocess_per_image(results, batched_inputs, [r.image_size for r in results], postprocess)
