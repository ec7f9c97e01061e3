import torch.nn.functional as F


def aligned_bilinear(x, factor):
    """Upsample by an integer ``factor`` so that output pixel ``factor * i + factor // 2`` sits on input pixel i.

    ``F.interpolate(align_corners=False)`` shifts the map by half a pixel relative to the stride
    convention of strided features (pixel i of a stride-s map is at image position s * i + s // 2);
    CondInst's (AdelaiDet's) upsampling keeps that convention, and released weights rely on it.

    Args:
        x: (N, C, H, W).
        factor: positive int.
    Returns:
        (N, C, factor * H, factor * W).
    """
    if x.dim() != 4:
        raise ValueError(f"aligned_bilinear expects (N, C, H, W), got shape {tuple(x.shape)}")
    factor = int(factor)
    if factor < 1:
        raise ValueError(f"aligned_bilinear: factor must be a positive integer, got {factor}")
    if factor == 1:
        return x
    height, width = x.shape[-2:]
    # One replicated row/column at the bottom/right gives the last pixel a neighbour to interpolate to.
    x = F.pad(x, pad=(0, 1, 0, 1), mode="replicate")
    x = F.interpolate(x, size=(factor * height + 1, factor * width + 1), mode="bilinear", align_corners=True)
    # Shift by factor // 2 so that input pixel i lands on output pixel factor * i + factor // 2.
    x = F.pad(x, pad=(factor // 2, 0, factor // 2, 0), mode="replicate")
    return x[:, :, : factor * height, : factor * width]
