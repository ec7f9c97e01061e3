import torch
import torch.nn.functional as F
from detectron2.structures import Instances


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
