from typing import List

import torch
import torch.nn.functional as F
from torch import nn
from detectron2.config import configurable
from detectron2.layers import cat
from detectron2.structures import Instances

from d2ext.layers import aligned_bilinear, dice_loss, rename_reference_keys

from ..fcos.targets import compute_locations


def relative_coordinates(instance_locations, pixel_locations, sizes_of_interest):
    """Offsets from each pixel to each instance's location, divided by the instance's size of interest.

    Args:
        instance_locations: (N, 2) (x, y) of the locations that predicted the instances.
        pixel_locations: (HW, 2) (x, y) of the mask-feature pixels.
        sizes_of_interest: (N,) normaliser per instance (its FPN level's size of interest).
    Returns:
        (N, 2, HW): (instance - pixel) / size of interest, x then y.
    """
    offsets = instance_locations[:, None, :] - pixel_locations[None, :, :]
    return offsets.permute(0, 2, 1) / sizes_of_interest.float()[:, None, None]


class DynamicMaskHead(nn.Module):
    """CondInst's dynamic mask head: per instance, ``num_layers`` 1x1 convs whose weights come from the
    controller, applied to the mask features (plus relative coordinates). All instances of all images
    run at once as batched matrix products (a 1x1 conv per instance; unlike a grouped convolution, the
    number of instances is not a constant of a traced graph).

    Parameters per instance, in the controller's output order: the weights of each layer (row-major
    (out, in)), then the biases of each layer.
    """

    _version = 2  # version 1 / no version: AdelaiDet's buffers (sizes_of_interest, _iter)

    @configurable
    def __init__(self, *, in_channels, channels=8, num_layers=3, sizes_of_interest=(64, 128, 256, 512, 1024),
                 mask_out_stride=4, disable_rel_coords=False, use_fp16=False):
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"MODEL.CONDINST.MASK_HEAD.NUM_LAYERS must be >= 1, got {num_layers}")
        self.num_layers = num_layers
        self.channels = channels
        self.mask_out_stride = mask_out_stride
        self.disable_rel_coords = disable_rel_coords
        self.use_fp16 = use_fp16
        layer_inputs = [in_channels + (0 if disable_rel_coords else 2)] + [channels] * (num_layers - 1)
        layer_outputs = [channels] * (num_layers - 1) + [1]
        self.layer_shapes = list(zip(layer_outputs, layer_inputs))
        self.register_buffer("sizes_of_interest", torch.tensor(list(sizes_of_interest), dtype=torch.int64),
                             persistent=False)

    @classmethod
    def from_config(cls, cfg, in_channels):
        soi = list(cfg.MODEL.FCOS.SIZES_OF_INTEREST)
        return {
            "in_channels": in_channels,
            "channels": cfg.MODEL.CONDINST.MASK_HEAD.CHANNELS,
            "num_layers": cfg.MODEL.CONDINST.MASK_HEAD.NUM_LAYERS,
            "sizes_of_interest": soi + [soi[-1] * 2],  # the last FPN level's normaliser (AdelaiDet's)
            "mask_out_stride": cfg.MODEL.CONDINST.MASK_OUT_STRIDE,
            "disable_rel_coords": cfg.MODEL.CONDINST.MASK_HEAD.DISABLE_REL_COORDS,
            "use_fp16": cfg.MODEL.CONDINST.MASK_HEAD.USE_FP16,
        }

    @property
    def num_params(self):
        """Dynamic parameters per instance (169 for AdelaiDet's defaults)."""
        return sum(out * inp + out for out, inp in self.layer_shapes)

    def split_params(self, params):
        """(N, num_params) -> per layer, weights (N, out, in) and biases (N, out, 1) of each instance's 1x1 conv."""
        if params.shape[1] != self.num_params:
            raise ValueError(f"dynamic mask head expects {self.num_params} parameters per instance, got {params.shape[1]}")
        weight_sizes = [out * inp for out, inp in self.layer_shapes]
        bias_sizes = [out for out, _ in self.layer_shapes]
        chunks = params.split(weight_sizes + bias_sizes, dim=1)
        weights = [w.unflatten(1, shape) for w, shape in zip(chunks[: self.num_layers], self.layer_shapes)]
        biases = [b[:, :, None] for b in chunks[self.num_layers:]]
        return weights, biases

    def forward(self, mask_feats, mask_feat_stride, instances: Instances):
        """
        Args:
            mask_feats: (B, C, H, W) mask-branch features of the batch, at ``mask_feat_stride``.
            instances: N instances of any images of the batch with ``im_inds`` (N,), ``locations``
                (N, 2), ``fpn_levels`` (N,) and ``mask_head_params`` (N, num_params).
        Returns:
            (N, 1, H * f, W * f) mask logits at ``mask_out_stride`` (f = mask_feat_stride / mask_out_stride).
        """
        if mask_feat_stride % self.mask_out_stride:
            raise ValueError(f"MODEL.CONDINST.MASK_OUT_STRIDE {self.mask_out_stride} must divide the mask "
                             f"branch stride {mask_feat_stride}")
        factor = mask_feat_stride // self.mask_out_stride
        height, width = mask_feats.shape[-2:]
        x = mask_feats[instances.im_inds]
        # Explicit sizes, not flatten: ONNX runtimes reject the -1 of a flatten when there is no instance.
        x = x.reshape(x.shape[0], x.shape[1], height * width)  # (N, C, H * W)
        if not self.disable_rel_coords:
            pixels = compute_locations(height, width, mask_feat_stride, mask_feats.device)
            coords = relative_coordinates(instances.locations, pixels, self.sizes_of_interest[instances.fpn_levels])
            x = torch.cat((coords.to(x.dtype), x), dim=1)
        weights, biases = self.split_params(instances.mask_head_params)
        if self.use_fp16:
            if not x.is_cuda:
                raise ValueError("MODEL.CONDINST.MASK_HEAD.USE_FP16=True needs a CUDA device")
            x, weights, biases = x.half(), [w.half() for w in weights], [b.half() for b in biases]
        for layer, (weight, bias) in enumerate(zip(weights, biases)):
            x = torch.baddbmm(bias, weight, x)  # (N, out, in) @ (N, in, H * W) + (N, out, 1)
            if layer < self.num_layers - 1:
                x = F.relu(x)
        logits = x.float().unflatten(2, (height, width))  # (N, 1, H, W)
        return aligned_bilinear(logits, factor)

    def loss(self, mask_feats, mask_feat_stride, instances: Instances, gt_instances: List[Instances]):
        """Mean dice loss of the sampled positives against their objects' stride-``mask_out_stride``
        bitmasks (``gt_bitmasks`` of ``gt_instances``, indexed by ``instances.gt_inds``)."""
        if len(instances) == 0:
            # No positive: a zero that keeps the mask branch and controller in the graph (DDP).
            return {"loss_mask": mask_feats.sum() * 0.0 + instances.mask_head_params.sum() * 0.0}
        probs = self.forward(mask_feats, mask_feat_stride, instances).sigmoid()
        targets = cat([x.gt_bitmasks for x in gt_instances])[instances.gt_inds][:, None]
        if targets.shape != probs.shape:
            raise ValueError(f"mask targets {tuple(targets.shape)} do not match the mask logits {tuple(probs.shape)}")
        return {"loss_mask": dice_loss(probs, targets).mean()}

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        version = local_metadata.get("version", None)
        if version is None or version < 2:
            key = prefix + "sizes_of_interest"
            if key in state_dict and state_dict[key].tolist() != self.sizes_of_interest.tolist():
                error_msgs.append(f"AdelaiDet key {key!r} is {state_dict[key].tolist()} but this config's sizes "
                                  f"of interest are {self.sizes_of_interest.tolist()} (MODEL.FCOS.SIZES_OF_INTEREST)")
            # Both buffers are derived from the config / training state here: not weights.
            rename_reference_keys(self, state_dict, prefix, lambda name: None, error_msgs, "AdelaiDet",
                                  ignored=("sizes_of_interest", "_iter"))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
