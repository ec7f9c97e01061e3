"""projects/convert_checkpoint.py: Detectron2 and mmdetection-wrapped checkpoints in, ours out."""
import pytest
import torch

from d2ext.testing import build_tiny_model, config_path, load_script, tiny_cfg

CONFIG = config_path("quickstart/mask_rcnn_R18_FPN_synthetic.yaml")


@pytest.fixture(scope="module")
def convert_checkpoint():
    return load_script("projects/convert_checkpoint.py")


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


def test_checkpoint_lacking_model_keys_is_an_error(convert_checkpoint, tmp_path):
    state = build_tiny_model(tiny_cfg(CONFIG), seed=3).state_dict()
    dropped = [key for key in state if key.startswith("roi_heads.mask_head.")]
    source, out = tmp_path / "partial.pth", tmp_path / "converted.pth"
    torch.save({"model": {k: v for k, v in state.items() if k not in dropped}}, source)
    reported = sorted(k for k in dropped if not k.endswith("num_batches_tracked"))  # BatchNorm fills that in
    with pytest.raises(ValueError, match=rf"does not hold {len(reported)} of .*roi_heads\.mask_head\.mask_fcn1\."):
        convert_checkpoint.convert(CONFIG, str(source), str(out))
    assert not out.exists()
    assert sorted(convert_checkpoint.convert(CONFIG, str(source), str(out), allow_missing=True)) == reported
    assert out.exists()


def test_keys_released_checkpoints_lack_are_not_missing(convert_checkpoint, tmp_path):
    """RDSNet's running loss normaliser and MBRM's released constants are not in released models."""
    config = config_path("quickstart/rdsnet_R18_FPN_synthetic.yaml")
    opts = ["MODEL.MBRM.ENABLED", "True"]
    state = build_tiny_model(tiny_cfg(config, opts), seed=3).state_dict()
    lacking = {"loss_normalizer", "mbrm.weight", "mbrm.bias"}
    assert lacking <= state.keys()
    source, out = tmp_path / "released.pth", tmp_path / "converted.pth"
    torch.save({"model": {k: v for k, v in state.items() if k not in lacking}}, source)
    assert convert_checkpoint.convert(config, str(source), str(out), opts) == []
    # A kernel other than the released one (s = 3) starts at zero: it is missing.
    torch.save({"model": {k: v for k, v in state.items() if k not in lacking}}, source)
    with pytest.raises(ValueError, match="mbrm.weight"):
        convert_checkpoint.convert(config, str(source), str(out), opts + ["MODEL.MBRM.KERNEL_HALF_SIZE", "3"])
