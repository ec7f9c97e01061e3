"""The input conventions that released weights were trained with, checked when they are loaded.

Detectron2's (and AdelaiDet's) ImageNet ResNets are MSRA's: BGR, a mean to subtract and no scaling (std 1), the
stride of a stage's first block on its 1x1 conv. mmdetection's (the official RDSNet's too) are torchvision's: RGB,
ImageNet mean and std, the stride on the 3x3 conv. Weights of one run in a model set up for the other without an
error, and give wrong outputs, so loading them is an error that names each differing config key.
"""
import torch
from detectron2.modeling.backbone.resnet import BottleneckBlock, DeformBottleneckBlock

MSRA = "MSRA"
TORCHVISION = "torchvision"
# convention -> (INPUT.FORMAT, whether PIXEL_STD is 1, RESNETS.STRIDE_IN_1X1)
_CONVENTIONS = {MSRA: ("BGR", True, True), TORCHVISION: ("RGB", False, False)}


def input_convention_mismatches(model, convention):
    """How ``model`` takes its input otherwise than weights trained in ``convention`` (``MSRA`` or
    ``TORCHVISION``) expect: a list of its config keys and values, with the convention's.

    ``model``: a meta-architecture with ``input_format``, ``pixel_std`` and ``backbone``.
    """
    input_format, unit_std, stride_in_1x1 = _CONVENTIONS[convention]
    mismatches = []
    if model.input_format != input_format:
        mismatches.append(f"INPUT.FORMAT {model.input_format!r} ({convention}: {input_format!r})")
    if bool(torch.all(model.pixel_std == 1)) != unit_std:
        std = [round(v, 3) for v in model.pixel_std.flatten().tolist()]
        mismatches.append(f"MODEL.PIXEL_STD {std} ({convention}: "
                          f"{'[1, 1, 1]' if unit_std else 'ImageNet, [58.395, 57.12, 57.375]'})")
    first_blocks = [m for m in model.backbone.modules()
                    if isinstance(m, (BottleneckBlock, DeformBottleneckBlock)) and m.stride != 1]
    if any((block.conv1.stride != (1, 1)) != stride_in_1x1 for block in first_blocks):
        mismatches.append(f"MODEL.RESNETS.STRIDE_IN_1X1 {not stride_in_1x1} ({convention}: {stride_in_1x1})")
    return mismatches


def check_input_conventions(model, convention, source, config_with_them, error_msgs):
    """Add an error to ``error_msgs`` (``load_state_dict``'s) if ``model`` takes its input otherwise than the
    weights of ``source`` (trained in ``convention``) expect; ``config_with_them`` names a config that has the
    right settings."""
    mismatches = input_convention_mismatches(model, convention)
    if mismatches:
        error_msgs.append(f"{source} checkpoint: the model takes its input otherwise than these weights were "
                          f"trained: {'; '.join(mismatches)}. Use {config_with_them}'s input settings.")
