import torch
from detectron2.structures import ImageList


def check_input_images(batched_inputs, num_channels=None):
    """Raise a ValueError naming the input whose ``image`` is not a (C, H, W) tensor with pixels (an empty
    crop, a greyscale (H, W) array), or whose C is not ``num_channels`` (the model's ``PIXEL_MEAN`` values,
    when given): the normalisation or the backbone's first conv would fail on it with a message about
    broadcasting or kernel sizes, or broadcast one channel to three. Not while tracing (export), where
    shapes are tensors."""
    if torch.jit.is_tracing():
        return
    for i, x in enumerate(batched_inputs):
        shape = tuple(x["image"].shape)
        if len(shape) != 3 or 0 in shape:
            raise ValueError(f"input {i}: 'image' must be a (C, H, W) tensor with C, H, W > 0, got shape {shape}")
        if num_channels is not None and shape[0] != num_channels:
            raise ValueError(f"input {i}: 'image' has {shape[0]} channels, the model normalises {num_channels} "
                             f"(MODEL.PIXEL_MEAN / PIXEL_STD), got shape {shape}")


def check_image_sizes(image_sizes):
    """Raise a ValueError naming the first image without rows or columns, for modules that see only the
    padded ``ImageList`` (``image_sizes``: (H, W) per image): ROI heads inside Detectron2's
    ``GeneralizedRCNN``, which pads such an image like any other and fails only when it rescales the
    detections by its size (a ZeroDivisionError). Not while tracing (export)."""
    if torch.jit.is_tracing():
        return
    for i, (height, width) in enumerate(image_sizes):
        if height == 0 or width == 0:
            raise ValueError(f"input {i}: the image has no pixels (size {height} x {width})")


class PixelNormalizationMixin:
    """Input normalisation of a Detectron2 meta-architecture with a ``backbone``, as in Detectron2's
    ``GeneralizedRCNN``: ``pixel_mean`` / ``pixel_std`` buffers (not saved in checkpoints), ``device`` and
    ``preprocess_image``. Mix into an ``nn.Module`` and call ``register_pixel_stats`` in ``__init__``."""

    def register_pixel_stats(self, pixel_mean, pixel_std):
        """``pixel_mean``, ``pixel_std``: C values each (``cfg.MODEL.PIXEL_MEAN`` / ``PIXEL_STD``), stored
        as (C, 1, 1) non-persistent buffers."""
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), False)

    @property
    def device(self):
        return self.pixel_mean.device

    def preprocess_image(self, batched_inputs):
        """Normalise each input's (C, H, W) ``image`` and pad the batch into an ``ImageList`` of
        (B, C, H', W'), H' and W' divisible by the backbone's ``size_divisibility``."""
        check_input_images(batched_inputs, len(self.pixel_mean))
        images = [(x["image"].to(self.device) - self.pixel_mean) / self.pixel_std for x in batched_inputs]
        # Newer Detectron2 backbones may carry padding constraints; v0.6 has only size_divisibility.
        constraints = getattr(self.backbone, "padding_constraints", None)
        extra = {"padding_constraints": constraints} if constraints is not None else {}
        return ImageList.from_tensors(images, self.backbone.size_divisibility, **extra)
