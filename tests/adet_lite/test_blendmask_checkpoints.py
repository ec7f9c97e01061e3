"""Released AdelaiDet BlendMask checkpoints (bare state dicts in AdelaiDet's names, listed in
tests/reference_keys/adelaidet_keys/blendmask.tsv) load through Detectron2's DetectionCheckpointer and through
projects/convert_checkpoint.py. The fake checkpoint uses the .tsv names and shapes (R-50, 80 classes)."""
import os
import re
import sys
from collections import OrderedDict

import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer

from d2ext.testing import (
    REPO_ROOT, assert_same_model, build_tiny_model, config_path, fake_bottom_up_state, predict, random_weight,
    read_reference_keys, tiny_cfg)

sys.path.insert(0, os.path.join(REPO_ROOT, "projects"))
from convert_checkpoint import convert  # noqa: E402


TSV = "adelaidet_keys/blendmask.tsv"
CONFIG = "BlendMask/R_50_1x.yaml"
# The full-size R-50 model runs on small inputs; random weights need a zero threshold.
OPTS = ["INPUT.MIN_SIZE_TEST", 64, "INPUT.MAX_SIZE_TEST", 96, "MODEL.FCOS.INFERENCE_TH_TEST", 0.0]


def _expected_name(name):
    """Our name for an AdelaiDet BlendMask key, written out independently of the loader."""
    match = re.fullmatch(r"(proposal_generator\.fcos_head)\.(cls|bbox)_tower\.(\d+)\.(\w+)", name)
    if match:
        head, tower, index, param = match.groups()
        layer, is_norm = divmod(int(index), 3)
        return f"{head}.{tower}_subnet.{layer}.{'norm.' if is_norm else ''}{param}"
    match = re.fullmatch(r"basis_module\.(refine|tower)\.(\d+)\.([01])\.(\w+)", name)
    if match:
        module, index, is_norm, param = match.groups()
        return f"basis_module.{module}.{index}.{'norm.' if is_norm == '1' else ''}{param}"
    semantic = {"0": "semantic_tower.0.", "1": "semantic_tower.0.norm.", "3": "semantic_tower.1.",
                "4": "semantic_tower.1.norm.", "6": "semantic_logits."}
    match = re.fullmatch(r"basis_module\.seg_head\.(\d)\.(\w+)", name)
    if match:
        return f"basis_module.{semantic[match.group(1)]}{match.group(2)}"
    return name.replace("fcos_head.cls_logits", "fcos_head.cls_score")


def _fake_adelaidet_checkpoint(model):
    torch.manual_seed(0)
    state = OrderedDict((name, torch.randint(0, 100, shape) if dtype == "int64" else random_weight(name, shape))
                        for name, shape, dtype in read_reference_keys(TSV))
    state.update(fake_bottom_up_state(model))  # ResNet keys: Detectron2's names (not in the .tsv)
    return state


@pytest.fixture(scope="module")
def adelaidet(tmp_path_factory):
    """(cfg, model with the fake AdelaiDet checkpoint loaded, the checkpoint, its path)."""
    cfg = tiny_cfg(config_path(CONFIG), OPTS)
    model = build_tiny_model(cfg).eval()
    state = _fake_adelaidet_checkpoint(model)
    path = str(tmp_path_factory.mktemp("adelaidet") / "blendmask_R_50_1x.pth")
    torch.save(state, path)
    DetectionCheckpointer(model).load(path)
    return cfg, model, state, path


def test_adelaidet_checkpoint_loads_and_equals_converted(adelaidet, tmp_path):
    cfg, model, state, path = adelaidet
    ours = model.state_dict()
    expected = {_expected_name(k): v for k, v in state.items()}
    assert set(expected) == set(ours)
    for name, value in expected.items():
        assert torch.equal(ours[name], value), name
    assert "basis_module.tower.5.weight" in ours and "top_layer.weight" in ours  # same names in both

    converted = str(tmp_path / "converted.pth")
    convert(config_path(CONFIG), path, converted, ["MODEL.WEIGHTS", "", *OPTS])
    other = build_tiny_model(cfg, seed=1)
    DetectionCheckpointer(other).load(converted)
    assert_same_model(model, other, cfg, fields=("pred_boxes", "scores", "pred_masks"))
    assert predict(model, cfg)[1][0].pred_masks.any()


def test_semantic_head_weights_dropped_without_loss_on(adelaidet):
    cfg, model, _, path = adelaidet
    cfg_off = tiny_cfg(config_path(CONFIG), OPTS + ["MODEL.BASIS_MODULE.LOSS_ON", False])
    other = build_tiny_model(cfg_off, seed=1).eval()
    DetectionCheckpointer(other).load(path)  # the seg_head keys only train: no error
    assert not any("semantic" in name for name in other.state_dict())
    a, b = predict(model, cfg)[1][0], predict(other, cfg_off)[1][0]
    assert len(a) > 0 and torch.equal(a.scores, b.scores) and torch.equal(a.pred_masks, b.pred_masks)


@pytest.mark.parametrize("key, value", [
    ("basis_module.tower.7.weight", torch.zeros(4, 128, 1, 1)),  # unknown
    ("basis_module.refine.0.0.weight", torch.zeros(128, 512, 3, 3)),  # renamed, mis-shaped
    ("basis_module.seg_head.6.weight", torch.zeros(82, 128, 1, 1)),  # renamed, mis-shaped
])
def test_unknown_or_misshaped_adelaidet_keys_are_errors(adelaidet, key, value, tmp_path):
    cfg, _, state, _ = adelaidet
    bad = OrderedDict(state)
    bad[key] = value
    torch.save(bad, tmp_path / "bad.pth")
    model = build_tiny_model(cfg)
    with pytest.raises(RuntimeError, match=re.escape(key)):
        DetectionCheckpointer(model).load(str(tmp_path / "bad.pth"))
