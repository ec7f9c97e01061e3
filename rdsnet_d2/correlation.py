"""Correlation module: each instance's two d-dim kernels (background, foreground) convolved (1x1, no
bias) with its image's pixel representations, all instances of a batch in one batched product."""
import torch

from d2ext.layers import NUM_QUADRATIC_COORDINATE_TERMS, quadratic_coordinate_logits, stable_argsort


def object_rep_length(rep_dim, box_coord_terms):
    """Values per slot of an object representation: d (``rep_dim``), plus the box coordinate terms'
    coefficients when ``box_coord_terms``."""
    return rep_dim + (NUM_QUADRATIC_COORDINATE_TERMS if box_coord_terms else 0)


def correlate(pixel_reps, object_reps, image_indices=None):
    """
    Args:
        pixel_reps: (B, d, H, W) pixel representations of the batch.
        object_reps: (N, 2, d) per instance: slot 0 background, slot 1 foreground kernel.
        image_indices: (N,) long, the image of each instance; None: all in the one image of a batch of one
            (inference, one image at a time: a plain product, without reading the indices back from a GPU).
    Returns:
        (N, 2, H, W) mask logits (softmax over dim 1; channel 1 = foreground).
    """
    if object_reps.dim() != 3 or object_reps.shape[1] != 2 or object_reps.shape[2] != pixel_reps.shape[1]:
        raise ValueError(f"correlate: object_reps must be (N, 2, {pixel_reps.shape[1]}), "
                         f"got {tuple(object_reps.shape)}")
    num_images, dim, height, width = pixel_reps.shape
    num = object_reps.shape[0]
    if image_indices is None:
        if num_images != 1:
            raise ValueError(f"correlate: image_indices are needed for a batch of {num_images} images")
        return (object_reps.reshape(num * 2, dim) @ pixel_reps.reshape(dim, height * width)).view(num, 2, height, width)
    if num == 0:
        return pixel_reps.new_zeros(0, 2, height, width)
    # Pad the instances of each image into (B, K, 2d) so that a single batched matmul serves the
    # whole batch without materialising a copy of the pixel map per instance.
    # Instances per image (a bincount, which ONNX lacks).
    counts = (image_indices[:, None] == torch.arange(num_images, device=image_indices.device)).sum(dim=0)
    if not torch.jit.is_tracing() and int(counts.sum()) != num:  # an index outside the batch was not counted
        raise ValueError(f"correlate: image_indices must lie in [0, {num_images}), the images of pixel_reps")
    order = stable_argsort(image_indices)
    sorted_images = image_indices[order]
    starts = torch.cumsum(counts, 0) - counts
    slots = torch.arange(num, device=image_indices.device) - starts[sorted_images]
    max_count = counts.max()  # a tensor, not an int: the size stays dynamic in traced graphs
    kernels = object_reps.new_zeros(num_images, max_count, 2 * dim)
    kernels[sorted_images, slots] = object_reps[order].flatten(1)
    logits = torch.bmm(kernels.view(num_images, max_count * 2, dim), pixel_reps.flatten(2))
    logits = logits.view(num_images, max_count, 2, height, width)
    result = logits.new_empty(num, 2, height, width)
    result[order] = logits[sorted_images, slots]
    return result


def box_coordinate_logits(coefficients, boxes, height, width):
    """Per instance and slot, :func:`d2ext.layers.quadratic_coordinate_logits` in coordinates normalised to the
    instance's box: 0 at its centre, -1 and 1 at its sides (a half-size below one pixel counts as one). Added
    to :func:`correlate`'s logits, it lets a mask favour part of its box, which the translation-invariant
    correlation cannot (a same-class neighbour inside the box looks the same).

    Args:
        coefficients: (N, 2, 4) per instance and slot.
        boxes: (N, 4) XYXY, in pixels of the (height, width) map.
    Returns:
        (N, 2, height, width) logits.
    """
    num_terms = NUM_QUADRATIC_COORDINATE_TERMS
    if coefficients.shape[1:] != (2, num_terms) or boxes.shape != (coefficients.shape[0], 4):
        raise ValueError(f"box_coordinate_logits: coefficients must be (N, 2, {num_terms}) and boxes "
                         f"(N, 4), got {tuple(coefficients.shape)} and {tuple(boxes.shape)}")
    centres = (boxes[:, :2] + boxes[:, 2:]) / 2
    half_sizes = ((boxes[:, 2:] - boxes[:, :2]) / 2).clamp(min=1.0)
    return quadratic_coordinate_logits(coefficients, centres, half_sizes, height, width)
