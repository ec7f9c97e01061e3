import re

_STAGE_BLOCK = re.compile(r"^layer(\d+)\.(\d+)\.(.+)$")
_BLOCK_PARTS = (
    (re.compile(r"^conv(\d)\.weight$"), r"conv\1.weight"),
    (re.compile(r"^bn(\d)\.(weight|bias|running_mean|running_var)$"), r"conv\1.norm.\2"),
    (re.compile(r"^downsample\.0\.weight$"), "shortcut.weight"),
    (re.compile(r"^downsample\.1\.(weight|bias|running_mean|running_var)$"), r"shortcut.norm.\1"),
)
_STEM = re.compile(r"^(?:conv1\.weight|bn1\.(weight|bias|running_mean|running_var))$")
_FPN = re.compile(r"^neck\.(lateral_convs|fpn_convs)\.(\d+)\.conv\.(weight|bias)$")


def mmdet_resnet_fpn_key(key, fpn_first_level=2):
    """Detectron2 name of an mmdetection ResNet ("pytorch" style) or FPN checkpoint key.

    mmdetection: ``backbone.conv1`` / ``backbone.bn1`` (stem), ``backbone.layer{i}.{b}.conv{k}`` /
    ``.bn{k}`` / ``.downsample.{0,1}``, ``neck.lateral_convs.{i}.conv`` / ``neck.fpn_convs.{i}.conv``.
    Detectron2: ``backbone.bottom_up.stem.conv1(.norm)``, ``backbone.bottom_up.res{i+1}.{b}.conv{k}(.norm)``
    / ``.shortcut(.norm)``, ``backbone.fpn_lateral{l}`` / ``backbone.fpn_output{l}``. Use the converted
    weights with ``MODEL.RESNETS.STRIDE_IN_1X1 False`` and RGB input.

    Args:
        fpn_first_level: pyramid level of the FPN's first input (2 when the neck starts at C2).
    Returns:
        the Detectron2 key; "" for BatchNorm's ``num_batches_tracked`` (Detectron2's FrozenBN has no such
        buffer: drop it); None when ``key`` is not a ResNet / FPN key of mmdetection.
    """
    if key.startswith("backbone.") and key.endswith(".num_batches_tracked"):
        return ""
    fpn = _FPN.match(key)
    if fpn:
        kind = "lateral" if fpn.group(1) == "lateral_convs" else "output"
        return f"backbone.fpn_{kind}{int(fpn.group(2)) + fpn_first_level}.{fpn.group(3)}"
    if not key.startswith("backbone."):
        return None
    local = key[len("backbone."):]
    stem = _STEM.match(local)
    if stem:
        return "backbone.bottom_up.stem.conv1." + ("weight" if stem.group(1) is None else f"norm.{stem.group(1)}")
    block = _STAGE_BLOCK.match(local)
    if block:
        stage, index, rest = block.groups()
        for pattern, replacement in _BLOCK_PARTS:
            if pattern.match(rest):
                return f"backbone.bottom_up.res{int(stage) + 1}.{index}.{pattern.sub(replacement, rest)}"
    return None
