"""Released AdelaiDet checkpoints (bare state dicts in AdelaiDet's names, listed in
tests/reference_keys/adelaidet_keys/*.tsv) load through Detectron2's own DetectionCheckpointer and through
projects/convert_checkpoint.py. The fake checkpoints here use the .tsv names and shapes (R-50, 80 classes)."""
import os
import re
import sys
from collections import OrderedDict

import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer

from d2ext.testing import (
    REPO_ROOT, assert_same_model, build_tiny_model, config_path, fake_bottom_up_state, random_weight,
    read_reference_keys, tiny_cfg)

sys.path.insert(0, os.path.join(REPO_ROOT, "projects"))
from convert_checkpoint import convert  # noqa: E402


# Full-size R-50 models (the .tsv shapes) run on small inputs; random weights need a zero threshold.
OPTS = ["INPUT.MIN_SIZE_TEST", 64, "INPUT.MAX_SIZE_TEST", 96, "MODEL.FCOS.INFERENCE_TH_TEST", 0.0]
CASES = {"fcos": "FCOS/MS_R_50_1x.yaml", "condinst": "CondInst/MS_R_50_1x.yaml",
         "boxinst": "CondInst/BoxInst_MS_R_50_3x.yaml"}


def _expected_name(adelaidet_name):
    """Our name for an AdelaiDet key, written out independently of the loader."""
    name = adelaidet_name.replace("centerness", "ctrness").replace("fcos_head.cls_logits", "fcos_head.cls_score")
    match = re.match(r"(.*fcos_head)\.(cls|bbox)_tower\.(\d+)\.(.*)", name)
    if match:
        head, tower, index, param = match.groups()
        layer, is_norm = divmod(int(index), 3)
        return f"{head}.{tower}_subnet.{layer}.{'norm.' if is_norm else ''}{param}"
    match = re.match(r"mask_branch\.(refine|tower)\.(\d+)\.([01])\.(.*)", name)
    if match:
        module, index, is_norm, param = match.groups()
        return f"mask_branch.{module}.{index}.{'norm.' if is_norm == '1' else ''}{param}"
    return name.replace("mask_branch.tower.4.", "mask_branch.predictor.")


def _fake_adelaidet_checkpoint(method, model):
    torch.manual_seed(0)
    state = OrderedDict()
    for name, shape, dtype in read_reference_keys(f"adelaidet_keys/{method}.tsv"):
        if name == "mask_head.sizes_of_interest":
            state[name] = torch.tensor([64, 128, 256, 512, 1024])
        elif dtype == "int64":
            state[name] = torch.randint(0, 100, shape)
        else:
            state[name] = random_weight(name, shape)
    state.update(fake_bottom_up_state(model))  # ResNet keys: Detectron2's names (not in the .tsv)
    return state


def _build(method):
    cfg = tiny_cfg(config_path(CASES[method]), OPTS)
    return cfg, build_tiny_model(cfg).eval()


@pytest.mark.parametrize("method", ["fcos", "condinst", "boxinst"])
def test_adelaidet_checkpoint_loads_and_equals_converted(method, tmp_path):
    cfg, model = _build(method)
    adelaidet = _fake_adelaidet_checkpoint(method, model)
    path = str(tmp_path / "adelaidet.pth")
    torch.save(adelaidet, path)
    DetectionCheckpointer(model).load(path)

    ours = model.state_dict()
    ignored = {"mask_head.sizes_of_interest", "mask_head._iter"}  # config / training state, not weights
    expected = {_expected_name(k): v for k, v in adelaidet.items() if k not in ignored}
    assert set(expected) == set(ours)
    for name, value in expected.items():
        assert torch.equal(ours[name], value), name

    converted = str(tmp_path / "converted.pth")
    convert(config_path(CASES[method]), path, converted, ["MODEL.WEIGHTS", "", *OPTS])
    other = build_tiny_model(cfg, seed=1)
    DetectionCheckpointer(other).load(converted)
    fields = ("pred_boxes", "scores") if method == "fcos" else ("pred_boxes", "scores", "pred_masks")
    assert_same_model(model, other, cfg, fields)


def test_old_centerness_name_loads(tmp_path):
    cfg, model = _build("fcos")
    adelaidet = _fake_adelaidet_checkpoint("fcos", model)
    old = OrderedDict((k.replace(".ctrness.", ".centerness."), v) for k, v in adelaidet.items())
    assert "proposal_generator.fcos_head.centerness.weight" in old
    torch.save(old, tmp_path / "old.pth")
    DetectionCheckpointer(model).load(str(tmp_path / "old.pth"))
    assert torch.equal(model.proposal_generator.fcos_head.ctrness.weight,
                       adelaidet["proposal_generator.fcos_head.ctrness.weight"])


@pytest.mark.parametrize("method, edit, message", [
    ("fcos", lambda s: s.__setitem__("proposal_generator.fcos_head.extra_conv.weight", torch.zeros(1)),
     "proposal_generator.fcos_head.extra_conv.weight"),
    ("fcos", lambda s: s.__setitem__("proposal_generator.fcos_head.cls_logits.weight", torch.zeros(81, 256, 3, 3)),
     "proposal_generator.fcos_head.cls_logits.weight"),
    ("condinst", lambda s: s.__setitem__("mask_branch.tower.4.weight", torch.zeros(16, 128, 1, 1)),
     "mask_branch.tower.4.weight"),
    ("condinst", lambda s: s.__setitem__("mask_branch.refine.7.0.weight", torch.zeros(1)),
     "mask_branch.refine.7.0.weight"),
    ("condinst", lambda s: s.__setitem__("mask_head.sizes_of_interest", torch.tensor([8, 16, 32, 64, 128])),
     "mask_head.sizes_of_interest"),
])
def test_unknown_or_misshaped_adelaidet_keys_are_errors(method, edit, message, tmp_path):
    cfg, model = _build(method)
    adelaidet = _fake_adelaidet_checkpoint(method, model)
    edit(adelaidet)
    torch.save(adelaidet, tmp_path / "bad.pth")
    with pytest.raises(RuntimeError, match=re.escape(message)):
        DetectionCheckpointer(model).load(str(tmp_path / "bad.pth"))
