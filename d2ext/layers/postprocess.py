import torch
import torch.nn.functional as F
from detectron2.structures import Boxes, Instances


def postprocess_full_image_masks(results, output_height, output_width, mask_threshold=0.5):
    """Detectron2's ``detector_postprocess`` for one-stage models whose masks cover the whole image.

    ``detector_postprocess`` treats ``pred_masks`` as (N, 1, M, M) RoI masks pasted into the boxes.
    One-stage models (CondInst, BlendMask, SOLO, RDSNet) predict soft masks over the network's input
    image instead; this rescales boxes like Detectron2 and resizes those masks to the output size.

    Args:
        results: ``Instances`` at the input resolution (``image_size`` = (h, w) of the resized image,
            before padding) with ``pred_boxes`` and optionally ``pred_masks`` (N, h', w') soft masks in
            [0, 1] covering the input image (h' x w' may be a lower resolution, e.g. stride 4).
        output_height, output_width: the original image size.
    Returns:
        ``Instances`` of size (output_height, output_width) with boolean ``pred_masks`` (N, H, W).
        Detections whose box is empty after clipping are dropped, as in Detectron2.
    """
    if not isinstance(output_height, torch.Tensor):  # while tracing, sizes are 0-dim tensors: keep them traced
        output_height, output_width = int(output_height), int(output_width)
    scale_x = output_width / results.image_size[1]
    scale_y = output_height / results.image_size[0]
    out = Instances((output_height, output_width), **results.get_fields())
    boxes = out.pred_boxes
    boxes.scale(scale_x, scale_y)
    boxes.clip(out.image_size)
    out = out[boxes.nonempty()]
    if out.has("pred_masks"):
        masks = out.pred_masks
        if masks.shape[0] == 0:
            out.pred_masks = masks.new_zeros((0, output_height, output_width), dtype=torch.bool)
        else:
            masks = F.interpolate(masks[:, None].float(), size=(output_height, output_width),
                                  mode="bilinear", align_corners=False)[:, 0]
            out.pred_masks = masks > mask_threshold
    return out


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
