"""Correlation module: each instance's two d-dim kernels (background, foreground) convolved (1x1, no
bias) with its image's pixel representations, all instances of a batch in one batched product."""
import torch

from d2ext.layers import stable_argsort


def correlate(pixel_reps, object_reps, image_indices):
    """
    Args:
        pixel_reps: (B, d, H, W) pixel representations of the batch.
        object_reps: (N, 2, d) per instance: slot 0 background, slot 1 foreground kernel.
        image_indices: (N,) long, the image of each instance.
    Returns:
        (N, 2, H, W) mask logits (softmax over dim 1; channel 1 = foreground).
    """
    if object_reps.dim() != 3 or object_reps.shape[1] != 2 or object_reps.shape[2] != pixel_reps.shape[1]:
        raise ValueError(f"correlate: object_reps must be (N, 2, {pixel_reps.shape[1]}), "
                         f"got {tuple(object_reps.shape)}")
    num_images, dim, height, width = pixel_reps.shape
    num = object_reps.shape[0]
    if num == 0:
        return pixel_reps.new_zeros(0, 2, height, width)
    # Pad the instances of each image into (B, K, 2d) so that a single batched matmul serves the
    # whole batch without materialising a copy of the pixel map per instance.
    # Instances per image (a bincount, which ONNX lacks).
    counts = (image_indices[:, None] == torch.arange(num_images, device=image_indices.device)).sum(dim=0)
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
