"""Reading image files for the demo and for error reports: any file Pillow reads, as 8-bit images."""
import numpy as np
from detectron2.data.detection_utils import convert_PIL_to_numpy
from detectron2.utils.file_io import PathManager
from PIL import Image, ImageOps

# Pillow's modes of 16-bit grey images ("I" is how Pillow < 10 opens 16-bit PNGs).
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_SIXTEEN_BIT_MAX = 65535


def _sixteen_to_eight_bit(image, path):
    """A 16-bit grey PIL image -> an "L" image, values scaled by 255 / 65535 (full range to full range)."""
    values = np.asarray(image).astype(np.float64)
    if values.size and (values.min() < 0 or values.max() > _SIXTEEN_BIT_MAX):
        raise ValueError(f"image {path!r} (Pillow mode {image.mode}) has values in [{values.min():g}, "
                         f"{values.max():g}], outside the 16-bit range [0, {_SIXTEEN_BIT_MAX}]")
    return Image.fromarray(np.round(values * (255 / _SIXTEEN_BIT_MAX)).astype(np.uint8), mode="L")


def read_image(path, format="BGR"):
    """Read an image file as Detectron2's ``read_image`` does, plus what it gets wrong or leaves unnamed.

    Grey (and 1-bit / palette) images are replicated to 3 channels, RGBA / LA lose their alpha, 16-bit
    grey images (PNG, TIFF) are scaled to 8 bits (Detectron2's conversion clips them at 255) and the
    EXIF orientation is applied. An empty, truncated or otherwise unreadable file raises an ``OSError``
    that names it (Pillow says only "image file is truncated"), a missing one Python's
    ``FileNotFoundError``; a floating-point or 32-bit image raises a ``ValueError`` naming the file and
    its mode.

    Args:
        path: image file (any path ``PathManager`` opens).
        format: "BGR", "RGB" or another of ``convert_PIL_to_numpy``'s formats (``cfg.INPUT.FORMAT``).

    Returns:
        (H, W, 3) uint8 array in ``format`` (H, W, 1 for "L").
    """
    try:
        with PathManager.open(path, "rb") as f:
            image = Image.open(f)
            image.load()  # decode now, inside this try: a damaged file fails here
    except FileNotFoundError:  # names the file already
        raise
    except Exception as e:  # Pillow raises OSError, SyntaxError, ValueError, ...: name the file in all cases
        raise OSError(f"cannot read image {path!r}: {type(e).__name__}: {e}") from e
    image = ImageOps.exif_transpose(image)
    if image.mode in _SIXTEEN_BIT_MODES:
        image = _sixteen_to_eight_bit(image, path)
    elif image.mode in ("F", "I;32", "I;32L", "I;32B"):
        raise ValueError(f"image {path!r} has Pillow mode {image.mode!r} (32-bit); convert it to 8 or 16 bits")
    return convert_PIL_to_numpy(image, format)
