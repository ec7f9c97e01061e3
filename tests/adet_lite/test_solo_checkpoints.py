"""Released-checkpoint key names (mmdetection 3.3 SOLO family, AdelaiDet SOLOv2) load through Detectron2's
DetectionCheckpointer: fake state dicts with the reference names and shapes (tests/reference_keys/)."""
import re

import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer

from d2ext.testing import build_tiny_model, config_path, read_reference_keys, tiny_cfg

CASES = {
    "solo": ("mmdet_solo_keys/keys_solo.tsv", "SOLO/solo_R50_1x.yaml"),
    "decoupled": ("mmdet_solo_keys/keys_decoupled_solo.tsv", "SOLO/decoupled_solo_R50_1x.yaml"),
    "light": ("mmdet_solo_keys/keys_decoupled_solo_light.tsv", "SOLO/decoupled_solo_light_R50_3x.yaml"),
    "mmdet_solov2": ("mmdet_solo_keys/keys_solov2.tsv", "SOLO/SOLOv2_R50_1x.yaml"),
    "adelaidet_solov2": ("adelaidet_keys/solov2.tsv", "SOLO/SOLOv2_R50_3x.yaml"),
}


def _mmdet_resnet50_keys():
    """The 318 mmdetection ResNet-50 keys that the .tsv files describe but omit."""
    bn = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    keys = {"backbone.conv1.weight": (64, 3, 7, 7)}
    keys.update({f"backbone.bn1.{p}": () if p == "num_batches_tracked" else (64,) for p in bn})
    in_channels = 64
    for stage, (blocks, width) in enumerate(zip((3, 4, 6, 3), (64, 128, 256, 512)), start=1):
        for b in range(blocks):
            prefix = f"backbone.layer{stage}.{b}"
            shapes = [(width, in_channels, 1, 1), (width, width, 3, 3), (4 * width, width, 1, 1)]
            for k, shape in enumerate(shapes, start=1):
                keys[f"{prefix}.conv{k}.weight"] = shape
                keys.update({f"{prefix}.bn{k}.{p}": () if p == "num_batches_tracked" else (shape[0],) for p in bn})
            if b == 0:
                keys[f"{prefix}.downsample.0.weight"] = (4 * width, in_channels, 1, 1)
                keys.update({f"{prefix}.downsample.1.{p}": () if p == "num_batches_tracked" else (4 * width,)
                             for p in bn})
            in_channels = 4 * width
    assert len(keys) == 318
    return keys


def _fake_checkpoint(case, model):
    tsv, _ = CASES[case]
    keys = {name: shape for name, shape, _ in read_reference_keys(tsv)}
    if case == "adelaidet_solov2":  # its backbone keys are Detectron2's own names
        keys.update({k: tuple(v.shape) for k, v in model.state_dict().items() if k.startswith("backbone.bottom_up.")})
    else:
        keys.update(_mmdet_resnet50_keys())
    g = torch.Generator().manual_seed(0)
    return {k: torch.randn(shape, generator=g) if shape else torch.tensor(7) for k, shape in keys.items()}


def _build(case):
    _, config = CASES[case]
    return build_tiny_model(tiny_cfg(config_path(config)))


@pytest.mark.parametrize("case", list(CASES))
def test_reference_checkpoint_loads_every_parameter(case, tmp_path):
    model = _build(case)
    fake = _fake_checkpoint(case, model)
    path = str(tmp_path / "reference.pth")
    torch.save(fake, path)
    DetectionCheckpointer(model).load(path)  # an unknown or mis-shaped key would raise
    state = model.state_dict()
    # Spot checks of the renaming (values, not only names).
    if case == "adelaidet_solov2":
        pairs = {"ins_head.cate_tower.3.weight": "category_branch.tower.1.weight",
                 "ins_head.kernel_tower.10.bias": "mask_branch.kernel_branch.tower.3.norm.bias",
                 "mask_head.convs_all_levels.3.conv0.0.weight": "mask_branch.feature_branch.levels.3.0.weight",
                 "mask_head.conv_pred.1.weight": "mask_branch.feature_branch.predictor.norm.weight"}
    else:
        pairs = {"backbone.layer2.0.downsample.1.running_var": "backbone.bottom_up.res3.0.shortcut.norm.running_var",
                 "backbone.bn1.weight": "backbone.bottom_up.stem.conv1.norm.weight",
                 "neck.fpn_convs.3.conv.weight": "backbone.fpn_output5.weight",
                 "mask_head.cls_convs.0.gn.bias": "category_branch.tower.0.norm.bias",
                 "mask_head.conv_cls.weight": "category_branch.predictor.weight"}
    for source, target in pairs.items():
        assert torch.equal(state[target], fake[source]), (source, target)
    # Every parameter came from the checkpoint: each equals one of the fake tensors.
    fake_values = {(tuple(v.shape), float(v.flatten()[0])) for v in fake.values() if v.dim() > 0}
    for name, value in state.items():
        assert (tuple(value.shape), float(value.flatten()[0])) in fake_values, name


def test_unknown_and_misshaped_reference_keys_are_named(tmp_path):
    model = _build("decoupled")
    fake = _fake_checkpoint("decoupled", model)
    fake["mask_head.conv_mask_list_z.0.weight"] = torch.zeros(3)
    torch.save(fake, str(tmp_path / "unknown.pth"))
    with pytest.raises(RuntimeError, match="mask_head.conv_mask_list_z.0.weight"):
        DetectionCheckpointer(model).load(str(tmp_path / "unknown.pth"))
    fake = _fake_checkpoint("decoupled", model)
    fake["mask_head.conv_mask_list_x.0.weight"] = torch.zeros(41, 256, 3, 3)
    torch.save(fake, str(tmp_path / "shape.pth"))
    with pytest.raises(RuntimeError, match="mask_head.conv_mask_list_x.0.weight"):
        DetectionCheckpointer(model).load(str(tmp_path / "shape.pth"))


@pytest.mark.parametrize("checkpoint, config, message", [
    # mmdetection's SOLOv2 weights into AdelaiDet's SOLOv2 config (BGR, MSRA R-50), and the other way round:
    # either would run, wrongly.
    ("mmdet_solov2", "adelaidet_solov2",
     "mmdetection checkpoint: the model takes its input otherwise than these weights were trained: INPUT.FORMAT "
     "'BGR' (torchvision: 'RGB'); MODEL.PIXEL_STD [1.0, 1.0, 1.0] (torchvision: ImageNet, [58.395, 57.12, 57.375]); "
     "MODEL.RESNETS.STRIDE_IN_1X1 True (torchvision: False). Use configs/SOLO/Base-SOLO.yaml's input settings."),
    ("adelaidet_solov2", "mmdet_solov2",
     "AdelaiDet checkpoint: the model takes its input otherwise than these weights were trained: INPUT.FORMAT "
     "'RGB' (MSRA: 'BGR'); MODEL.PIXEL_STD [58.395, 57.12, 57.375] (MSRA: [1, 1, 1]); "
     "MODEL.RESNETS.STRIDE_IN_1X1 False (MSRA: True). Use configs/SOLO/Base-SOLOv2.yaml's input settings."),
])
def test_checkpoint_into_a_model_with_other_input_conventions_is_an_error(checkpoint, config, message, tmp_path):
    model = _build(config)
    fake = _fake_checkpoint(checkpoint, model)
    torch.save(fake, str(tmp_path / "reference.pth"))
    with pytest.raises(RuntimeError, match=re.escape(message)):
        DetectionCheckpointer(model).load(str(tmp_path / "reference.pth"))


def test_released_solov2_into_a_model_with_relative_coordinate_terms_is_an_error(tmp_path):
    """MODEL.SOLOV2.RELATIVE_COORD_TERMS (not AdelaiDet's) adds 4 kernel values per cell: the error names the key."""
    model = build_tiny_model(tiny_cfg(config_path(CASES["adelaidet_solov2"][1]),
                                      ["MODEL.SOLOV2.RELATIVE_COORD_TERMS", True]))
    torch.save(_fake_checkpoint("adelaidet_solov2", model), str(tmp_path / "reference.pth"))
    with pytest.raises(RuntimeError, match="set MODEL.SOLOV2.RELATIVE_COORD_TERMS False"):
        DetectionCheckpointer(model).load(str(tmp_path / "reference.pth"))
