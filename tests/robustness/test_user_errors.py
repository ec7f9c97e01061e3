"""User errors (issue 8): unusual image files through the demo, unknown config keys and values of the wrong
type, checkpoints of another architecture or class count, and missing or unreadable dataset images.

Every error names what is wrong (the file, the key); a checkpoint is never loaded silently: what is skipped
is reported by name, and a checkpoint that loads nothing is an error. Models are the quick-start configs
(``configs/quickstart/``) of the 8 methods, at their default sizes (building one takes ~0.1 s)."""
import contextlib
import copy
import logging
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import tifffile
import torch
import yaml
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.engine import DefaultPredictor
from detectron2.modeling import GeneralizedRCNN
from detectron2.structures import Instances
from PIL import Image

from d2ext.data.image_io import read_image
from d2ext.data.mapper import DatasetMapper
from d2ext.engine import Trainer, setup_cfg
from d2ext.testing import (REPO_ROOT, build_tiny_model, config_path, dataset_batch, load_script, tiny_cfg,
                           train_step)

# name: (quick-start config, opts selecting the variant, the key of the number of classes)
MODELS = {
    "nlroi_mask_rcnn": ("nlroi_mask_rcnn_R18_FPN_synthetic.yaml", [], "MODEL.ROI_HEADS.NUM_CLASSES"),
    "fcos": ("fcos_R18_synthetic.yaml", [], "MODEL.FCOS.NUM_CLASSES"),
    "condinst": ("condinst_R18_synthetic.yaml", [], "MODEL.FCOS.NUM_CLASSES"),
    "blendmask": ("blendmask_R18_synthetic.yaml", [], "MODEL.FCOS.NUM_CLASSES"),
    "solo": ("solo_R18_FPN_synthetic.yaml", ["MODEL.SOLO.VARIANT", "SOLO"], "MODEL.SOLO.NUM_CLASSES"),
    "decoupled_solo": ("solo_R18_FPN_synthetic.yaml", ["MODEL.SOLO.VARIANT", "DecoupledSOLO"],
                       "MODEL.SOLO.NUM_CLASSES"),
    "solov2": ("solov2_R18_FPN_synthetic.yaml", [], "MODEL.SOLOV2.NUM_CLASSES"),
    "rdsnet": ("rdsnet_R18_FPN_synthetic.yaml", [], "MODEL.RETINANET.NUM_CLASSES"),
    "rdsnet_fcos": ("rdsnet_fcos_R18_synthetic.yaml", [], "MODEL.FCOS.NUM_CLASSES"),
}
# For each model, a model of another architecture whose checkpoint it is given.
OTHER_ARCHITECTURE = {
    "nlroi_mask_rcnn": "fcos", "fcos": "solo", "condinst": "blendmask", "blendmask": "solov2",
    "solo": "solov2", "decoupled_solo": "solo", "solov2": "rdsnet", "rdsnet": "nlroi_mask_rcnn",
    "rdsnet_fcos": "condinst",
}
parametrize_models = pytest.mark.parametrize("name", list(MODELS))
DEMO_MODEL = "fcos"


def model_cfg(name, opts=()):
    config, variant, _ = MODELS[name]
    return tiny_cfg(config_path("quickstart/" + config), [*variant, *opts])


# ---------------------------------------------------------------------------------------- image files
def _write_png(path, array):
    Image.fromarray(array).save(path)


GREY = (np.arange(24 * 32).reshape(24, 32) * 7 % 256).astype(np.uint8)
RGB = np.stack([GREY, 255 - GREY, GREY // 2], axis=-1)
SIXTEEN = (np.arange(24 * 32).reshape(24, 32) * 85).astype(np.uint16)  # 0 .. 65195: the full 16-bit range
SIXTEEN_AS_EIGHT = np.round(SIXTEEN * (255 / 65535)).astype(np.uint8)

# file name (the stems differ: the demo writes the overlay of x.* to x.png): (writer, expected RGB array)
IMAGE_FILES = {
    "grey.png": (lambda p: _write_png(p, GREY), np.stack([GREY] * 3, axis=-1)),
    "rgba.png": (lambda p: _write_png(p, np.dstack([RGB, 255 - GREY])), RGB),  # alpha dropped, not blended
    "grey16.png": (lambda p: _write_png(p, SIXTEEN), np.stack([SIXTEEN_AS_EIGHT] * 3, axis=-1)),
    "grey16_tiff.tif": (lambda p: tifffile.imwrite(p, SIXTEEN), np.stack([SIXTEEN_AS_EIGHT] * 3, axis=-1)),
    "rgb16.tif": (lambda p: tifffile.imwrite(p, np.stack([SIXTEEN, 65535 - SIXTEEN, SIXTEEN // 2], axis=-1)),
                  np.stack([SIXTEEN_AS_EIGHT, 255 - SIXTEEN_AS_EIGHT, np.round(SIXTEEN // 2 * (255 / 65535))],
                           axis=-1).astype(np.uint8)),
}


def _tolerance(file_name):
    """Pillow reads a 16-bit RGB TIFF as its high bytes (v // 256): within 1 of the scaled value."""
    return 1 if file_name == "rgb16.tif" else 0


def _write_truncated_png(path):
    full = str(path) + ".full.png"
    _write_png(full, RGB)
    with open(full, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])


# file name: writer of a file that is not a readable image (None: no file at all)
UNREADABLE_FILES = {
    "missing.png": None,
    "empty.png": lambda p: open(p, "wb").close(),
    "not_an_image.png": lambda p: open(p, "wb").write(b"plain text, not a PNG"),
    "truncated.png": _write_truncated_png,  # Pillow's own message is only "image file is truncated"
}


def write_images(folder, files):
    """Write each ``{name: writer}`` under ``folder``; returns the paths in the same order."""
    paths = []
    for name, writer in files.items():
        path = os.path.join(folder, name)
        if writer is not None:
            writer(path)
        paths.append(path)
    return paths


@pytest.mark.parametrize("file_name", list(IMAGE_FILES))
def test_read_image_converts_grey_rgba_and_16_bit_to_8_bit_3_channels(file_name, tmp_path):
    writer, expected_rgb = IMAGE_FILES[file_name]
    (path,) = write_images(str(tmp_path), {file_name: writer})
    rgb, bgr = read_image(path, "RGB"), read_image(path, "BGR")
    assert rgb.dtype == np.uint8 and rgb.shape == expected_rgb.shape
    assert np.abs(rgb.astype(int) - expected_rgb).max() <= _tolerance(file_name)
    assert np.array_equal(bgr, rgb[:, :, ::-1])


@pytest.mark.parametrize("file_name", list(UNREADABLE_FILES))
def test_read_image_error_names_an_unreadable_file(file_name, tmp_path):
    (path,) = write_images(str(tmp_path), {file_name: UNREADABLE_FILES[file_name]})
    with pytest.raises(OSError, match=re.escape(path)):
        read_image(path, "BGR")


def test_read_image_rejects_a_float_image_by_name(tmp_path):
    path = str(tmp_path / "float.tif")
    tifffile.imwrite(path, SIXTEEN.astype(np.float32) / 65535)  # Detectron2's reader makes it all zeros
    with pytest.raises(ValueError, match=re.escape(path) + ".*mode 'F'"):
        read_image(path, "BGR")


def test_demo_writes_overlays_of_unusual_images_and_names_an_unreadable_one(tmp_path):
    folder = str(tmp_path / "inputs")
    os.makedirs(folder)
    good = write_images(folder, {name: writer for name, (writer, _) in IMAGE_FILES.items()})
    (bad,) = write_images(folder, {"truncated.png": _write_truncated_png})
    output = tmp_path / "overlays"
    config = config_path("quickstart/" + MODELS[DEMO_MODEL][0])
    # A randomly initialised FCOS scores ~prior_prob = 0.01: nothing is drawn above the demo's threshold
    # (0.5), so each overlay is the image as the demo converted it.
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO_ROOT, "projects", "demo.py"), "--config-file", config,
         "--input", *good, bad, "--output", str(output),
         "--opts", "MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", "", "INPUT.MIN_SIZE_TEST", "64",
         "INPUT.MAX_SIZE_TEST", "96"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert f"cannot read image '{bad}'" in proc.stderr, proc.stderr[-3000:]
    for file_name, (_, expected_rgb) in IMAGE_FILES.items():
        overlay = np.asarray(Image.open(output / (os.path.splitext(file_name)[0] + ".png")))
        assert overlay.dtype == np.uint8 and overlay.shape == expected_rgb.shape, file_name
        assert np.abs(overlay.astype(int) - expected_rgb).max() <= _tolerance(file_name), file_name
    assert not (output / "truncated.png").exists()


class RecordingModel(torch.nn.Module):
    """Stands in for a model behind ``DefaultPredictor``: keeps the image tensor it is given."""

    def forward(self, inputs):
        self.image = inputs[0]["image"]
        return [{"instances": Instances((inputs[0]["height"], inputs[0]["width"]))}]


@pytest.mark.parametrize("input_format", ["BGR", "RGB"])
def test_demo_gives_the_model_its_input_format(input_format, tmp_path):
    path = str(tmp_path / "red.png")
    Image.fromarray(np.full((8, 8, 3), (255, 0, 0), np.uint8)).save(path)
    cfg = tiny_cfg(config_path("quickstart/" + MODELS[DEMO_MODEL][0]), ["INPUT.FORMAT", input_format])
    predictor = DefaultPredictor(cfg)
    predictor.model = RecordingModel()
    _, rgb = load_script("projects/demo.py").predict_file(predictor, path)
    red_channel = 0 if input_format == "RGB" else 2
    pixel = predictor.model.image[:, 0, 0].tolist()
    assert pixel[red_channel] == 255 and sum(pixel) == 255, pixel
    assert rgb[0, 0].tolist() == [255, 0, 0]


def test_demo_inputs_with_one_output_name_are_an_error(tmp_path):
    demo = load_script("projects/demo.py")
    # One file given twice (in its folder and by name) is one input, not a collision.
    (tmp_path / "a.png").write_bytes(b"")
    given = [str(tmp_path), str(tmp_path / "a.png"), f"{tmp_path}//a.png"]
    assert demo.expand_inputs(given) == [str(tmp_path / "a.png")]
    assert demo.output_names(["a/x.png", "b/y.jpg"]) == ["x.png", "y.png"]
    with pytest.raises(ValueError, match=re.escape("'a/x.png' and 'b/x.jpg' would both be written to 'x.png'")):
        demo.output_names(["a/x.png", "b/x.jpg"])


# ---------------------------------------------------------------------------------------- config keys
QUICKSTART_OF_FAMILY = {"NL_ROI": "nlroi_mask_rcnn", "RDSNET": "rdsnet", "MBRM": "rdsnet", "FCOS": "fcos",
                        "CONDINST": "condinst", "BLENDMASK": "blendmask", "SOLO": "solo", "SOLOV2": "solov2"}
# One key of each package's own config nodes: a number and a list.
NUMBER_KEYS = ["MODEL.NL_ROI.EMBED_CHANNELS", "MODEL.RDSNET.REP_DIM", "MODEL.MBRM.GAMMA", "MODEL.FCOS.NUM_CLASSES",
               "MODEL.CONDINST.MASK_HEAD.CHANNELS", "MODEL.BLENDMASK.ATTN_SIZE", "MODEL.SOLO.NUM_CLASSES",
               "MODEL.SOLOV2.NUM_KERNELS"]
LIST_KEYS = ["MODEL.RDSNET.PIXEL_IN_FEATURES", "MODEL.FCOS.FPN_STRIDES", "MODEL.CONDINST.MASK_BRANCH.IN_FEATURES",
             "MODEL.SOLO.NUM_GRIDS", "MODEL.SOLOV2.FPN_SCALE_RANGES"]


def _family_config(key):
    return config_path("quickstart/" + MODELS[QUICKSTART_OF_FAMILY[key.split(".")[1]]][0])


def _yaml_overriding(tmp_path, base, key, value):
    """A YAML with ``_BASE_: base`` that sets the dotted ``key`` to ``value``."""
    node = value
    for part in reversed(key.split(".")):
        node = {part: node}
    path = tmp_path / "user.yaml"
    path.write_text(yaml.safe_dump({"_BASE_": base, **node}))
    return str(path)


@pytest.mark.parametrize("key", [k.rsplit(".", 1)[0] + ".NO_SUCH_KEY" for k in NUMBER_KEYS]
                         + ["MODEL.SOLO.NUM_GRID", "MODEL.FCOS.NUM_CLASS"])
def test_unknown_config_key_is_an_error_naming_it(key, tmp_path):
    base = _family_config(key)
    # yacs: an AssertionError from a KEY VALUE list, a KeyError from a YAML; both name the full key.
    with pytest.raises((AssertionError, KeyError), match=re.escape(key)):
        setup_cfg(base, [key, "1"])
    with pytest.raises(KeyError, match=re.escape(key)):
        setup_cfg(_yaml_overriding(tmp_path, base, key, 1))


@pytest.mark.parametrize("key, value", [(k, v) for k in NUMBER_KEYS for v in ("abc", [1, 2])]
                         + [(k, v) for k in LIST_KEYS for v in (5, "abc")])
def test_wrong_value_type_is_an_error_naming_the_key(key, value, tmp_path):
    base = _family_config(key)
    with pytest.raises(ValueError, match=f"Type mismatch .* for config key: {re.escape(key)}$"):
        setup_cfg(base, [key, str(value)])
    with pytest.raises(ValueError, match=f"Type mismatch .* for config key: {re.escape(key)}$"):
        setup_cfg(_yaml_overriding(tmp_path, base, key, value))


# Values of the right type but out of range, each failing deep inside a tensor op (or, for the thresholds,
# accepted with silently empty or wrong output) before the models checked them; found by trying 0, -1, 2.0,
# "bogus" and shortened or negated lists on every key of the packages' config nodes.
# (model, opts, the key the error must name)
OUT_OF_RANGE = [
    ("fcos", ["MODEL.FCOS.NUM_CLASSES", "0"], "MODEL.FCOS.NUM_CLASSES"),
    ("fcos", ["MODEL.FCOS.PRIOR_PROB", "0.0"], "MODEL.FCOS.PRIOR_PROB"),
    ("fcos", ["MODEL.FCOS.PRE_NMS_TOPK_TEST", "-1"], "MODEL.FCOS.PRE_NMS_TOPK_TEST"),
    ("fcos", ["MODEL.FCOS.INFERENCE_TH_TEST", "2.0"], "MODEL.FCOS.INFERENCE_TH_TEST"),
    ("fcos", ["MODEL.FCOS.FPN_STRIDES", "[-8, -16, -32, -64, -128]"], "MODEL.FCOS.FPN_STRIDES"),
    ("fcos", ["MODEL.FCOS.NORM", "bogus"], "MODEL.FCOS.NORM"),
    # Positive but not the features' strides: the locations and centre regions would be off.
    ("fcos", ["MODEL.FCOS.FPN_STRIDES", "[16, 32, 64, 128, 256]"], "MODEL.FCOS.FPN_STRIDES"),
    ("condinst", ["MODEL.FCOS.FPN_STRIDES", "[8, 16, 32, 64, 128]"], "MODEL.FCOS.FPN_STRIDES"),  # its P2-P6
    ("condinst", ["MODEL.CONDINST.MASK_OUT_STRIDE", "0"], "MODEL.CONDINST.MASK_OUT_STRIDE"),
    ("condinst", ["MODEL.CONDINST.MAX_PROPOSALS", "0"], "MODEL.CONDINST.MAX_PROPOSALS"),
    ("condinst", ["MODEL.CONDINST.MASK_BRANCH.NORM", "GN", "MODEL.CONDINST.MASK_BRANCH.CHANNELS", "48"],
     "MODEL.CONDINST.MASK_BRANCH.NORM"),
    ("blendmask", ["MODEL.BLENDMASK.ATTN_SIZE", "0"], "MODEL.BLENDMASK.ATTN_SIZE"),
    ("blendmask", ["MODEL.BLENDMASK.POOLER_TYPE", "bogus"], "MODEL.BLENDMASK.POOLER_TYPE"),
    ("blendmask", ["MODEL.BASIS_MODULE.CONVS_DIM", "0"], "MODEL.BASIS_MODULE.CONVS_DIM"),
    ("solo", ["MODEL.SOLO.NUM_INSTANCE_CONVS", "0"], "MODEL.SOLO.NUM_INSTANCE_CONVS"),
    ("solo", ["MODEL.SOLO.FPN_INSTANCE_STRIDES", "[-8, -8, -16, -32, -32]"], "MODEL.SOLO.FPN_INSTANCE_STRIDES"),
    ("solo", ["MODEL.SOLO.FPN_INSTANCE_STRIDES", "[8, 8, 16, 32, 64]"], "MODEL.SOLO.FPN_INSTANCE_STRIDES"),
    ("decoupled_solo", ["MODEL.SOLO.SIGMA", "-1.0"], "MODEL.SOLO.SIGMA"),
    ("solov2", ["MODEL.SOLOV2.FPN_INSTANCE_STRIDES", "[4, 8, 16, 32, 32]"], "MODEL.SOLOV2.FPN_INSTANCE_STRIDES"),
    ("solov2", ["MODEL.SOLOV2.NORM", "GN", "MODEL.SOLOV2.NUM_MASKS", "48", "MODEL.SOLOV2.NUM_KERNELS", "48"],
     "MODEL.SOLOV2.NORM"),
    ("solov2", ["MODEL.SOLOV2.MASK_CHANNELS", "0"], "MODEL.SOLOV2.MASK_CHANNELS"),
    ("solov2", ["MODEL.SOLOV2.NORM", "bogus"], "MODEL.SOLOV2.NORM"),
    ("solov2", ["MODEL.SOLOV2.MASK_THR", "2.0"], "MODEL.SOLOV2.MASK_THR"),
    ("rdsnet", ["MODEL.RDSNET.PIXEL_CONV_DIM", "0"], "MODEL.RDSNET.PIXEL_CONV_DIM"),
    ("rdsnet", ["MODEL.RDSNET.HEAD_NORM", "bogus"], "MODEL.RDSNET.HEAD_NORM"),
    ("rdsnet", ["MODEL.RDSNET.TRAIN_CROP_EXPAND", "-1.0"], "MODEL.RDSNET.TRAIN_CROP_EXPAND"),
    ("rdsnet", ["MODEL.RDSNET.TOP_LEVELS", "0"], "MODEL.RETINANET.IN_FEATURES"),
    ("rdsnet", ["MODEL.MBRM.ENABLED", "True", "MODEL.MBRM.KERNEL_HALF_SIZE", "-1"], "MODEL.MBRM.KERNEL_HALF_SIZE"),
    ("nlroi_mask_rcnn", ["MODEL.NL_ROI.EMBED_CHANNELS", "0"], "MODEL.NL_ROI.EMBED_CHANNELS"),
]


@pytest.mark.parametrize("name, opts, key", OUT_OF_RANGE, ids=[" ".join(opts) for _, opts, _ in OUT_OF_RANGE])
def test_out_of_range_value_is_an_error_naming_the_key_when_the_model_is_built(name, opts, key):
    with pytest.raises(ValueError, match=re.escape(key)):
        build_tiny_model(model_cfg(name, opts))


@pytest.mark.parametrize("config", ["fcos_R18_synthetic.yaml", "nlroi_mask_rcnn_R18_FPN_synthetic.yaml",
                                    "mask_rcnn_R18_FPN_synthetic.yaml"])
@pytest.mark.parametrize("switch", ["ENABLED", "TRAIN"])
def test_mbrm_switch_on_a_model_without_mbrm_is_an_error(config, switch):
    cfg = setup_cfg(config_path(f"quickstart/{config}"), [f"MODEL.MBRM.{switch}", "True"])
    with pytest.raises(ValueError, match=f"MODEL.MBRM.{switch} .* has no MBRM post-processing"):
        Trainer.build_model(cfg)


@pytest.mark.parametrize("config, roi_heads", [("mask_rcnn_R18_FPN_synthetic.yaml", "StandardROIHeads"),
                                              ("mask_rcnn_R18_FPN_synthetic.yaml", "CascadeROIHeads"),
                                              ("fcos_R18_synthetic.yaml", "StandardROIHeads")])
@pytest.mark.parametrize("switch", ["SOFT_NMS", "BOX_VOTE"])
def test_soft_nms_or_box_vote_switch_on_a_model_without_them_is_an_error(config, roi_heads, switch):
    cfg = setup_cfg(config_path(f"quickstart/{config}"), [f"MODEL.ROI_HEADS.{switch}.ENABLED", "True",
                                                         "MODEL.ROI_HEADS.NAME", roi_heads,
                                                         "MODEL.ROI_BOX_HEAD.CLS_AGNOSTIC_BBOX_REG", "True"])
    with pytest.raises(ValueError, match=f"MODEL.ROI_HEADS.{switch}.ENABLED is True but nothing .* applies it"):
        Trainer.build_model(cfg)


@pytest.mark.parametrize("roi_heads", ["NLRoIROIHeads", "NLRoICascadeROIHeads"])
def test_soft_nms_and_box_vote_switches_on_nl_roi_heads_build(roi_heads):
    cfg = setup_cfg(config_path("quickstart/nlroi_mask_rcnn_R18_FPN_synthetic.yaml"),
                    ["MODEL.ROI_HEADS.SOFT_NMS.ENABLED", "True", "MODEL.ROI_HEADS.BOX_VOTE.ENABLED", "True",
                     "MODEL.ROI_HEADS.NAME", roi_heads, "MODEL.ROI_BOX_HEAD.CLS_AGNOSTIC_BBOX_REG", "True"])
    Trainer.build_model(cfg)


def test_mbrm_switch_on_a_model_with_mbrm_builds():
    cfg = setup_cfg(config_path("quickstart/condinst_R18_synthetic.yaml"), ["MODEL.MBRM.ENABLED", "True"])
    assert Trainer.build_model(cfg).mbrm is not None


# ---------------------------------------------------------------------------------------- checkpoints
@contextlib.contextmanager
def checkpointer_log():
    """Collect the messages of Detectron2's checkpointer (fvcore's ``Checkpointer`` logger) in a list."""
    records = []
    handler = logging.Handler(logging.INFO)
    handler.emit = records.append
    logger = logging.getLogger("fvcore.common.checkpoint")
    previous_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield records
    finally:
        logger.removeHandler(handler)
        logger.setLevel(previous_level)


def _uncolored(text):
    return re.sub(r"\x1b\[[0-9;]*m", "", text)


def reported_keys(records, heading):
    """The keys listed by the checkpointer message that starts with ``heading``, expanding its grouping of
    keys with a common prefix ("a.b.{weight, bias}") back into full names."""
    keys = set()
    for record in records:
        lines = _uncolored(record.getMessage()).splitlines()
        if not lines or not lines[0].startswith(heading):
            continue
        for line in lines[1:]:
            grouped = re.fullmatch(r"(\S+)\.\{(.*)\}", line.strip())
            if grouped:
                keys |= {f"{grouped[1]}.{leaf}" for leaf in grouped[2].split(", ")}
            else:
                keys.add(line.strip())
    return keys


MISSING = "Some model parameters or buffers are not found in the checkpoint"
UNEXPECTED = "The checkpoint state_dict contains keys that are not used by the model"


def skipped_for_shape(records):
    """Keys the checkpointer skipped for their shapes."""
    return {m[1] for r in records for m in [re.match(r"Skip loading parameter '([^']+)'", r.getMessage())] if m}


def save_checkpoint(model, directory, keep_versions=True):
    """Save ``model`` as Detectron2's checkpointer does; without ``keep_versions``, as a plain dict without
    the modules' version metadata (as converted or hand-made checkpoints are), which makes the models'
    reference-name loaders look at every key."""
    DetectionCheckpointer(model, save_dir=str(directory)).save("source")
    path = os.path.join(str(directory), "source.pth")
    if not keep_versions:
        torch.save({"model": dict(model.state_dict())}, path)
    return path


def assert_loaded_from(model, source_state, keys):
    state = model.state_dict()
    for key in keys:
        assert torch.equal(state[key], source_state[key]), key


# Detectron2's own ROI heads (NL-RoI Mask R-CNN) do not check the classes: left to Detectron2.
@pytest.mark.parametrize("name", [name for name in MODELS if name != "nlroi_mask_rcnn"])
@pytest.mark.parametrize("bad_class", ["num_classes", -1])
def test_gt_class_outside_the_class_count_is_an_error_naming_the_key(name, bad_class):
    """A class equal to the class count would train as background; a larger or negative one would fail
    inside one_hot or index another class."""
    _, _, classes_key = MODELS[name]
    cfg = model_cfg(name)
    batch = dataset_batch(cfg, indices=(0, 1))
    value = cfg.MODEL[classes_key.split(".")[1]].NUM_CLASSES if bad_class == "num_classes" else bad_class
    batch[1]["instances"].gt_classes[-1] = value
    # BlendMask's basis module derives its semantic targets (classes) before FCOS's loss runs.
    named_key = "MODEL.BASIS_MODULE.NUM_CLASSES" if name == "blendmask" else classes_key
    with pytest.raises(ValueError, match=rf"image 1 has class {value}, but classes must lie in "
                                         rf"\[0, {re.escape(named_key)}\)"):
        train_step(build_tiny_model(cfg), batch)


@parametrize_models
def test_checkpoint_of_another_class_count_reports_each_skipped_key(name, tmp_path):
    _, _, classes_key = MODELS[name]
    source = build_tiny_model(model_cfg(name), seed=0)
    path = save_checkpoint(source, tmp_path)
    model = build_tiny_model(model_cfg(name, [classes_key, 3]), seed=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    source_state, own = source.state_dict(), model.state_dict()
    mismatched = {k for k in own if k in source_state and source_state[k].shape != own[k].shape}
    assert mismatched, "the class count must change the shape of some weights"
    with checkpointer_log() as records:
        DetectionCheckpointer(model).load(path)
    assert skipped_for_shape(records) == mismatched
    assert mismatched <= reported_keys(records, MISSING)
    for key in mismatched:  # kept at the model's initialisation, not garbage from the checkpoint
        assert torch.equal(model.state_dict()[key], before[key]), key
    assert_loaded_from(model, source_state, set(own) - mismatched)


@parametrize_models
@pytest.mark.parametrize("keep_versions", [True, False], ids=["saved", "plain_dict"])
def test_checkpoint_of_another_architecture_reports_missing_and_unused_keys(name, keep_versions, tmp_path):
    source = build_tiny_model(model_cfg(OTHER_ARCHITECTURE[name]), seed=0)
    path = save_checkpoint(source, tmp_path, keep_versions)
    model = build_tiny_model(model_cfg(name), seed=1)
    source_state, own = source.state_dict(), model.state_dict()
    assert set(source_state) - set(own) and set(own) - set(source_state)
    same_shape = {k for k in own if k in source_state and source_state[k].shape == own[k].shape}
    assert same_shape, "the two models share a backbone: that part loads"
    with checkpointer_log() as records:
        DetectionCheckpointer(model).load(path)
    # BatchNorm fills in a missing num_batches_tracked itself (torch): never reported missing.
    assert reported_keys(records, MISSING) == {k for k in own if not k.endswith("num_batches_tracked")} - same_shape
    assert reported_keys(records, UNEXPECTED) == set(source_state) - set(own)
    assert skipped_for_shape(records) == {k for k in own if k in source_state} - same_shape
    assert_loaded_from(model, source_state, same_shape)


def test_plain_checkpoint_keys_unknown_to_a_reference_loader_are_named(tmp_path):
    """Without version metadata, FCOS-head keys are read as AdelaiDet's: a key that is neither the model's
    nor a known AdelaiDet name is an error naming it (not Detectron2's "unused" warning), and saying why."""
    source = build_tiny_model(model_cfg("condinst"))  # FCOS head with per-level scales
    model = build_tiny_model(model_cfg("blendmask"))  # without
    scales = {k for k in source.state_dict() if ".scales." in k}
    assert scales and not scales & set(model.state_dict())
    path = save_checkpoint(source, tmp_path, keep_versions=False)
    with pytest.raises(RuntimeError) as error:
        DetectionCheckpointer(model).load(path)
    for key in scales:
        assert f"unknown key '{key}': FCOSHead has no such parameter" in str(error.value), key
    assert "the checkpoint is read as AdelaiDet's" in str(error.value)
    # With this repository's metadata the same checkpoint is Detectron2's report of unused keys.
    with checkpointer_log() as records:
        DetectionCheckpointer(model).load(save_checkpoint(source, tmp_path))
    assert scales <= reported_keys(records, UNEXPECTED)


@parametrize_models
@pytest.mark.parametrize("checkpoint", ["foreign_names", "wrong_shapes", "empty"])
def test_checkpoint_that_loads_nothing_is_an_error(name, checkpoint, tmp_path):
    cfg = model_cfg(name)
    trainer_model = Trainer.build_model(cfg)
    own = trainer_model.state_dict()
    state = {
        "foreign_names": {"layer1.0.conv1.weight": torch.zeros(8, 3, 3, 3), "fc.bias": torch.zeros(10)},
        "wrong_shapes": {k: torch.zeros(*v.shape, 1) for k, v in own.items()},
        "empty": {},
    }[checkpoint]
    path = str(tmp_path / "nothing.pth")
    torch.save({"model": state}, path)
    expected = "Nothing was loaded into .*" + ("layer1.0.conv1.weight" if checkpoint == "foreign_names" else
                                             "other shapes")
    # Through the trainer (train_net.py's --eval-only and training) every model raises, Detectron2's
    # GeneralizedRCNN (NL-RoI's meta-architecture) included.
    with pytest.raises(RuntimeError, match=expected):
        DetectionCheckpointer(trainer_model).load(path)
    model = build_tiny_model(cfg)
    if isinstance(model, GeneralizedRCNN):
        # Detectron2's own meta-architecture built by Detectron2's build_model: Detectron2's report only,
        # which lists every parameter of the model as not found.
        with checkpointer_log() as records:
            DetectionCheckpointer(model).load(path)
        assert reported_keys(records, MISSING) == {k for k in own if not k.endswith("num_batches_tracked")}
        return
    with pytest.raises(RuntimeError, match=expected):
        DetectionCheckpointer(model).load(path)


def test_empty_load_check_sees_through_a_wrapper(tmp_path):
    """Detectron2's trainer checkpoints the DDP-wrapped model: its keys carry a "module." prefix."""
    wrapper = torch.nn.Module()
    wrapper.module = build_tiny_model(model_cfg("fcos"))
    with pytest.raises(RuntimeError, match="Nothing was loaded into OneStageDetector"):
        wrapper.load_state_dict({"module.fc.weight": torch.zeros(1)}, strict=False)
    wrapper.load_state_dict({k: v.clone() for k, v in wrapper.state_dict().items() if "bottom_up" in k},
                            strict=False)  # a partial load is no error


# ---------------------------------------------------------------------------------------- dataset files
@pytest.fixture
def bad_record_datasets(tmp_path):
    """One registered dataset per unreadable image: a copy of a real record whose ``file_name`` is that
    file. Yields {name: file path}; unregisters them afterwards."""
    record = DatasetCatalog.get("synthetic_shapes_mini_train")[0]
    paths = write_images(str(tmp_path), UNREADABLE_FILES)
    datasets = {}
    for path in paths:
        name = f"user_errors_{os.path.basename(path)}_{id(tmp_path)}"
        bad = {**copy.deepcopy(record), "file_name": path}
        DatasetCatalog.register(name, lambda bad=bad: [copy.deepcopy(bad)])
        MetadataCatalog.get(name).set(thing_classes=MetadataCatalog.get("synthetic_shapes_mini_train").thing_classes)
        datasets[name] = path
    yield datasets
    for name in datasets:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)


def test_training_and_inference_loading_name_an_unreadable_image(bad_record_datasets):
    for dataset, path in bad_record_datasets.items():
        cfg = model_cfg("solo", ["DATASETS.TRAIN", (dataset,), "DATALOADER.NUM_WORKERS", 0,
                                 "SOLVER.IMS_PER_BATCH", 1])
        (record,) = DatasetCatalog.get(dataset)
        for is_train in (True, False):
            with pytest.raises(OSError, match=re.escape(path)):
                DatasetMapper(cfg, is_train=is_train)(copy.deepcopy(record))
        with pytest.raises(OSError, match=re.escape(path)):
            next(iter(Trainer.build_train_loader(cfg)))
        with pytest.raises(OSError, match=re.escape(path)):
            next(iter(Trainer.build_test_loader(cfg, dataset)))
