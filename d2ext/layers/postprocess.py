import torch
import torch.nn.functional as F
from detectron2.structures import Boxes, Instances


def postprocess_full_image_masks(results, output_height, output_width, mask_threshold=0.5, refine_boxes=None,
                                 chunk_size=16, input_size_masks=None):
    """Detectron2's ``detector_postprocess`` for one-stage models whose masks cover the whole image.

    ``detector_postprocess`` treats ``pred_masks`` as (N, 1, M, M) RoI masks pasted into the boxes.
    One-stage models (CondInst, BlendMask, SOLO, RDSNet) predict soft masks over the network's input
    image instead; this rescales boxes like Detectron2 and resizes those masks to the output size.

    Masks are resized ``chunk_size`` detections at a time, so that full-size float masks of one chunk
    only are in memory (100 detections at 800 x 1333 are 430 MB as float, 107 MB as the boolean result).

    ``refine_boxes`` is the hook of box refiners that read the soft masks (MBRM, see rdsnet_d2): it sees
    the soft masks at the output size before they are thresholded, which exist nowhere else. It is called
    on each chunk and returns that chunk's boxes; chunks, not the whole image's ``Instances``, so that the
    loop that makes the soft masks stays here, once, and the hook is a plain function of (masks, boxes)
    (an ``MBRM`` module is one). The hook must treat detections independently (chunking must not change
    its result).

    Args:
        results: ``Instances`` at the input resolution (``image_size`` = (h, w) of the resized image,
            before padding) with ``pred_boxes`` and optionally ``pred_masks`` (N, h', w') soft masks in
            [0, 1] covering the input image (h' x w' may be a lower resolution, e.g. stride 4).
        output_height, output_width: the original image size.
        mask_threshold: soft mask -> boolean mask (strictly above).
        refine_boxes: None, or ``f(soft_masks (n, H, W), boxes (n, 4)) -> (n, 4)`` boxes at the output
            size H x W (needs ``pred_masks``).
        chunk_size: detections resized at once.
        input_size_masks: None, or ``f(pred_masks (n, h', w'), (h, w)) -> (n, h, w)`` soft masks over the input
            image, for models whose ``pred_masks`` cover more than it (SOLO's cover the padded input):
            applied to each chunk before the resize to the output size.
    Returns:
        ``Instances`` of size (output_height, output_width) with boolean ``pred_masks`` (N, H, W) and,
        with ``refine_boxes``, its boxes. Detections whose box is empty after clipping are dropped, as in
        Detectron2 (before the refinement).
    """
    if not isinstance(output_height, torch.Tensor):  # while tracing, sizes are 0-dim tensors: keep them traced
        output_height, output_width = int(output_height), int(output_width)
    if refine_boxes is not None and not results.has("pred_masks"):
        raise ValueError("postprocess_full_image_masks: refine_boxes reads the soft masks, but the "
                         "instances have no pred_masks")
    if chunk_size < 1:
        raise ValueError(f"postprocess_full_image_masks: chunk_size must be >= 1, got {chunk_size}")
    scale_x = output_width / results.image_size[1]
    scale_y = output_height / results.image_size[0]
    fields = dict(results.get_fields())
    # Set aside: selecting the non-empty detections would copy every soft mask (430 MB for 100 masks
    # of 800 x 1333); each chunk's are selected instead.
    masks = fields.pop("pred_masks", None)
    fields["pred_boxes"] = boxes = fields["pred_boxes"].clone()  # the caller's boxes stay as they are
    out = Instances((output_height, output_width), **fields)
    boxes.scale(scale_x, scale_y)
    boxes.clip(out.image_size)
    nonempty = boxes.nonempty()
    out = out[nonempty]
    if masks is None:
        return out
    kept = torch.nonzero(nonempty).flatten()
    binary = masks.new_empty((kept.shape[0], output_height, output_width), dtype=torch.bool)
    refined = out.pred_boxes.tensor.clone()
    for start in range(0, kept.shape[0], chunk_size):
        chunk = slice(start, start + chunk_size)
        soft = masks[kept[chunk]]
        if input_size_masks is not None:
            soft = input_size_masks(soft, results.image_size)
        soft = resize_soft_masks(soft.float(), (output_height, output_width))
        if refine_boxes is not None:
            refined[chunk] = refine_boxes(soft, refined[chunk])
        binary[chunk] = soft > mask_threshold
    out.pred_masks = binary
    if refine_boxes is not None:
        out.pred_boxes = Boxes(refined)
    return out


def resize_soft_masks(masks, size):
    """(n, h, w) soft masks -> (n, *size), bilinear (align_corners=False); ``masks`` themselves when ``size`` is
    None or already theirs: what the interpolation would give (exactly), without its cost on full-size masks."""
    if size is None or (not torch.jit.is_tracing() and tuple(masks.shape[-2:]) == tuple(size)):
        return masks
    return F.interpolate(masks[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]


def postprocess_per_image(results, batched_inputs, image_sizes, postprocess):
    """Detectron2's ``GeneralizedRCNN._postprocess`` with a model's own per-image post-processing.

    Args:
        results: per image ``Instances`` at the input resolution.
        batched_inputs: the model's inputs; ``height`` / ``width`` (default: the input size) give each
            output size.
        image_sizes: per image (h, w) input size before padding.
        postprocess: ``f(instances, output_height, output_width) -> Instances``.
    Returns:
        list of ``{"instances": Instances}``, one per image.
    """
    return [
        {"instances": postprocess(result, inputs.get("height", size[0]), inputs.get("width", size[1]))}
        for result, inputs, size in zip(results, batched_inputs, image_sizes)
    ]


def mask_bounding_boxes(masks):
    """Tight boxes of binary masks, as Detectron2's ``BitMasks.get_bounding_boxes`` computes them
    (x1, y1 of the first pixel, x2, y2 one past the last; all zero for an empty mask), without a loop
    over the masks, so that it traces and exports.

    Args:
        masks: (N, H, W) bool.
    Returns:
        ``Boxes`` (N, 4) float32.
    """
    boxes = []
    for occupied in (masks.any(dim=1), masks.any(dim=2)):  # columns (N, W), then rows (N, H)
        positions = torch.arange(occupied.shape[1], device=masks.device)
        first = torch.where(occupied, positions, occupied.shape[1]).min(dim=1).values
        last = torch.where(occupied, positions + 1, 0).max(dim=1).values
        boxes.append((first, last))
    (x1, x2), (y1, y2) = boxes
    empty = ~masks.flatten(1).any(dim=1)
    box = torch.stack([x1, y1, x2, y2], dim=1).float()
    return Boxes(box.masked_fill(empty[:, None], 0.0))


def capped_count(count, cap):
    """``min(count, cap)`` for a count read from a tensor's shape. While tracing, shapes are 0-dim tensors:
    the result then stays one (``torch.clamp``) instead of becoming a constant of the traced graph, so
    that ``topk`` and slicing follow the input size of exported models."""
    if isinstance(count, torch.Tensor):
        return torch.clamp(count, max=cap)
    return min(count, cap)


def stable_argsort(values, descending=False):
    """Indices that sort the 1-d ``values``, ties in their input order (``torch.argsort(stable=True)``).

    ONNX has no stable sort, but its ``TopK`` breaks ties by the lower index, which makes it one: a full
    ``topk`` is what an ONNX export records (the TorchScript-based exporter rejects ``stable=True``).
    """
    if torch.onnx.is_in_onnx_export():
        return values.topk(values.shape[0], largest=descending).indices
    return torch.argsort(values, descending=descending, stable=True)
