"""The NL-RoI block (Tseng et al. 2018, Eq. 1-3): non-local attention among the RoIs of one image."""
import math
from typing import List, Sequence, Union

import torch
from torch import nn
from torch.nn import functional as F

import fvcore.nn.weight_init as weight_init
from detectron2.layers import Conv2d


def _counts_tensor(num_per_image: Union[Sequence[int], torch.Tensor], num_rois: int, device) -> torch.Tensor:
    """Validate the per-image RoI counts and return them as an int64 tensor on ``device``."""
    if torch.jit.is_tracing():
        # The counts are traced sizes (0-dim tensors): stacked, they stay inputs of the graph (as_tensor
        # would record constants); the checks below would only check the traced image.
        return torch.stack([torch.as_tensor(n) for n in num_per_image]).to(device=device, dtype=torch.int64)
    counts = torch.as_tensor(num_per_image, dtype=torch.int64, device=device).reshape(-1)
    if counts.numel() == 0:
        raise ValueError("NLRoIBlock: num_per_image is empty; give one RoI count per image.")
    if bool((counts < 0).any()):
        raise ValueError(f"NLRoIBlock: negative RoI count in num_per_image={counts.tolist()}.")
    total = int(counts.sum())
    if total != num_rois:
        raise ValueError(
            f"NLRoIBlock: num_per_image sums to {total} but the input holds {num_rois} RoIs; the RoIs "
            "must be the concatenation of each image's RoIs in image order."
        )
    return counts


class NLRoIBlock(nn.Module):
    """Non-local RoI block: every RoI attends to all RoIs of its own image.

    For the RoIs ``x_1..x_n`` of one image (Eq. 1-2 of the paper)::

        a_ij = softmax_j( phi(x_i) . psi(x_j) )          # phi, psi flattened to Df*H*W
        y_i  = sum_j a_ij * avgpool(g(x_j))               # (Dg,)
        out_i = concat(x_i, tile_HxW(y_i))                # (D + Dg, H, W)

    All images of a batch are processed at once: the RoIs are scattered into a padded
    (B, max_n, .) batch, the affinities are masked beyond each image's count, and the result is
    gathered back, so no RoI ever sees another image's RoIs and there is no Python loop over images.
    The affinity and softmax run in float32 (also under fp16/bf16 autocast): unscaled dot products
    of Df*H*W-dim embeddings overflow fp16.
    """

    def __init__(self, in_channels: int, embed_channels: int, g_channels: int, *, scale_affinity: bool = False):
        """
        Args:
            in_channels: D, channels of the RoI features.
            embed_channels: Df, output channels of ``phi`` and ``psi``.
            g_channels: Dg, output channels of ``g`` (the channels appended to the RoI features).
            scale_affinity: divide the affinities by sqrt(Df*H*W) (off in the paper).
        """
        super().__init__()
        for name, value in (("in_channels", in_channels), ("embed_channels", embed_channels),
                            ("g_channels", g_channels)):
            if int(value) <= 0:
                raise ValueError(f"NLRoIBlock: {name} must be positive, got {value}.")
        self.in_channels = in_channels
        self.embed_channels = embed_channels
        self.g_channels = g_channels
        self.scale_affinity = scale_affinity
        self.phi = Conv2d(in_channels, embed_channels, kernel_size=1)
        self.psi = Conv2d(in_channels, embed_channels, kernel_size=1)
        self.g = nn.Sequential(
            Conv2d(in_channels, g_channels, kernel_size=1),
            nn.ReLU(),
            Conv2d(g_channels, g_channels, kernel_size=3, padding=1),
        )
        # Small embeddings give near-uniform attention at the start (the RoI mean of the image);
        # g gets MSRA fill so the appended channels carry signal as soon as the next layer uses them.
        for conv in (self.phi, self.psi):
            nn.init.normal_(conv.weight, std=0.01)
            nn.init.zeros_(conv.bias)
        for conv in (self.g[0], self.g[2]):
            weight_init.c2_msra_fill(conv)

    @property
    def out_channels(self) -> int:
        return self.in_channels + self.g_channels

    def forward(self, x: torch.Tensor, num_per_image: Union[List[int], torch.Tensor]) -> torch.Tensor:
        """
        Args:
            x: (N, D, H, W) RoI features of the whole batch, the RoIs of image 0 first, then image 1, ...
            num_per_image: (B,) list or tensor of RoI counts, summing to N (zeros allowed).

        Returns:
            (N, D + Dg, H, W): ``x`` followed by the tiled non-local feature of each RoI.
        """
        nonlocal_feature = self.nonlocal_features(x, num_per_image)
        height, width = x.shape[-2:]
        return torch.cat([x, nonlocal_feature[:, :, None, None].expand(-1, -1, height, width)], dim=1)

    def nonlocal_features(self, x: torch.Tensor, num_per_image: Union[List[int], torch.Tensor]) -> torch.Tensor:
        """The non-local feature y_i of every RoI, before tiling: what :meth:`forward` appends at every
        position. The NL-RoI heads take it as is (``input_extension``): tiled, it would be D + Dg channels
        of which Dg are constant over H x W.

        Args: as :meth:`forward`.
        Returns:
            (N, Dg).
        """
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"NLRoIBlock expects (N, {self.in_channels}, H, W) RoI features, got {tuple(x.shape)}."
            )
        num_rois = x.shape[0]
        counts = _counts_tensor(num_per_image, num_rois, x.device)

        # phi, psi and g's first conv all read x: one 1x1 conv with their stacked weights reads it once.
        stacked_weight = torch.cat([self.phi.weight, self.psi.weight, self.g[0].weight])
        stacked_bias = torch.cat([self.phi.bias, self.psi.bias, self.g[0].bias])
        query, key, g_input = F.conv2d(x, stacked_weight, stacked_bias).split(
            [self.embed_channels, self.embed_channels, self.g_channels], dim=1)
        query = query.flatten(1).float()  # (N, Df*H*W)
        key = key.flatten(1).float()  # (N, Df*H*W)
        value = self.g[1:](g_input).mean(dim=(2, 3)).float()  # (N, Dg): pooled before attending (both are linear)

        num_images = counts.numel()
        max_count = counts.max()  # a tensor, not an int: the size stays dynamic in traced graphs
        image_index = torch.repeat_interleave(torch.arange(num_images, device=x.device), counts)  # (N,)
        first_row = torch.cumsum(counts, 0) - counts  # (B,)
        slot = torch.arange(num_rois, device=x.device) - first_row[image_index]  # (N,): position in its image

        # Indexed by (image, slot), without reshapes: an ONNX Reshape reads a 0 in the target shape (no
        # RoI) as "keep this dimension".
        def padded(rows: torch.Tensor) -> torch.Tensor:  # (N, C) -> (B, max_count, C), zero padding
            out = rows.new_zeros(num_images, max_count, rows.shape[1])
            out[image_index, slot] = rows
            return out

        with torch.autocast(device_type=x.device.type, enabled=False):
            affinity = torch.bmm(padded(query), padded(key).transpose(1, 2))  # (B, max_count, max_count)
            if self.scale_affinity:
                affinity = affinity / math.sqrt(query.shape[1])
            is_padding = torch.arange(max_count, device=x.device)[None, :] >= counts[:, None]  # (B, max_count)
            # A finite floor, not -inf: rows of padding (and of 0-RoI images) stay finite and are dropped.
            affinity = affinity.masked_fill(is_padding[:, None, :], torch.finfo(affinity.dtype).min)
            attention = torch.softmax(affinity, dim=2)
            nonlocal_feature = torch.bmm(attention, padded(value))  # (B, max_count, Dg)
        return nonlocal_feature[image_index, slot].to(x.dtype)
