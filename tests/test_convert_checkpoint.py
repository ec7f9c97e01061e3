"""projects/convert_checkpoint.py: Detectron2 and mmdetection-wrapped checkpoints in, ours out."""
import importlib.util
import os

import pytest
import torch

from d2ext.testing import build_tiny_model, config_path, tiny_cfg

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = config_path("quickstart/mask_rcnn_R18_FPN_synthetic.yaml")


@pytest.fixture(scope="module")
def convert_checkpoint():
    spec = importlib.util.spec_from_file_location("convert_checkpoint",
                                                  os.path.join(REPO, "projects", "convert_checkpoint.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("wrapper", ["detectron2", "mmdet", "bare"])
def test_convert_round_trip(convert_checkpoint, tmp_path, wrapper):
    state = build_tiny_model(tiny_cfg(CONFIG), seed=3).state_dict()
    source = tmp_path / "released.pth"
    payload = {"detectron2": {"model": state}, "mmdet": {"state_dict": state, "meta": {"epoch": 12}},
               "bare": state}[wrapper]
    torch.save(payload, source)
    out = tmp_path / "converted.pth"
    convert_checkpoint.convert(CONFIG, str(source), str(out))
    converted = torch.load(out, map_location="cpu", weights_only=True)["model"]
    assert converted.keys() == state.keys()
    for key, value in state.items():
        assert torch.equal(converted[key], value), key
