"""Export (``d2ext.export``, ``projects/export_model.py``): every one-stage model and NL-RoI Mask R-CNN
with hard NMS, traced on one image to TorchScript and to ONNX (run in onnxruntime), then run on a second
image of another size, with another number of detections, against the eager model on that image.

The tiny models are randomly initialised: each config's score threshold is set where the two images give
different, non-zero numbers of detections (asserted), so that sizes and counts must both be dynamic.
"""
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from detectron2.utils.testing import assert_instances_allclose
from PIL import Image

from d2ext import export
from d2ext.testing import (REPO_ROOT, build_tiny_model, config_path, dataset_batch, load_script, tiny_cfg,
                           visible_blendmask_masks)

SMALL = ["INPUT.MIN_SIZE_TEST", 128, "INPUT.MAX_SIZE_TEST", 192]


def _solo(node, score_threshold, *extra):
    """SOLO-family options: every mask accepted (random-init masks are faint), no cap below the candidates."""
    return [*extra, f"MODEL.{node}.SCORE_THR", score_threshold, f"MODEL.{node}.MASK_THR", 1e-5,
            f"MODEL.{node}.UPDATE_THR", 0.0, f"MODEL.{node}.MAX_PER_IMG", 1000]


# name: (quick-start config, options). Thresholds: the traced image 0 and the tested image 1 of the mini
# split give different detection counts (e.g. FCOS 46 / 64).
MODELS = {
    "nlroi_mask_rcnn": ("nlroi_mask_rcnn_R18_FPN_synthetic.yaml", [
        "MODEL.ROI_HEADS.SOFT_NMS.ENABLED", False, "MODEL.ROI_HEADS.BOX_VOTE.ENABLED", False,
        "MODEL.ROI_HEADS.SCORE_THRESH_TEST", 0.23, "TEST.DETECTIONS_PER_IMAGE", 100,
        # Fewer candidates than the cap: the number of proposals varies with the image too.
        "MODEL.RPN.PRE_NMS_TOPK_TEST", 200, "MODEL.RPN.POST_NMS_TOPK_TEST", 1000]),
    "fcos": ("fcos_R18_synthetic.yaml", ["MODEL.FCOS.INFERENCE_TH_TEST", 0.014, "MODEL.FCOS.POST_NMS_TOPK_TEST", 100]),
    "condinst": ("condinst_R18_synthetic.yaml", ["MODEL.FCOS.INFERENCE_TH_TEST", 0.009,
                                                 "MODEL.FCOS.POST_NMS_TOPK_TEST", 100]),
    "blendmask": ("blendmask_R18_synthetic.yaml", ["MODEL.FCOS.INFERENCE_TH_TEST", 0.008,
                                                   "MODEL.FCOS.POST_NMS_TOPK_TEST", 100]),
    "solo": ("solo_R18_FPN_synthetic.yaml", _solo("SOLO", 0.013)),
    "decoupled_solo": ("solo_R18_FPN_synthetic.yaml", _solo("SOLO", 0.013, "MODEL.SOLO.VARIANT", "DecoupledSOLO")),
    "solov2": ("solov2_R18_FPN_synthetic.yaml", _solo("SOLOV2", 0.016)),
    "solov2_relative_coord_terms": ("solov2_R18_FPN_synthetic.yaml",
                                    _solo("SOLOV2", 0.016, "MODEL.SOLOV2.RELATIVE_COORD_TERMS", True)),
    "rdsnet": ("rdsnet_R18_FPN_synthetic.yaml", ["MODEL.RETINANET.SCORE_THRESH_TEST", 0.016,
                                                 "TEST.DETECTIONS_PER_IMAGE", 1000]),
    "rdsnet_fcos": ("rdsnet_fcos_R18_synthetic.yaml", ["MODEL.FCOS.INFERENCE_TH_TEST", 0.007,
                                                       "MODEL.FCOS.POST_NMS_TOPK_TEST", 100]),
}
# RDSNet forms its masks directly at the original size; its exported masks are formed at the input size
# and resized afterwards (documented in RDSNetMasks.inference), so only its input-size outputs equal eager ones.
RESIZES_LIKE_EAGER = set(MODELS) - {"rdsnet", "rdsnet_fcos"}


def _model(name, opts=()):
    config, options = MODELS[name]
    cfg = tiny_cfg(config_path(f"quickstart/{config}"), SMALL + options + list(opts))
    model = build_tiny_model(cfg).eval()
    return cfg, visible_blendmask_masks(model) if name == "blendmask" else model


def _eager(model, image):
    with torch.no_grad():
        return model.inference([{"image": image}], do_postprocess=False)[0]


def _export(model, export_format, traced_image, directory):
    """Export ``model`` traced on ``traced_image``; returns a function running the export on an image."""
    if export_format == "torchscript":
        path = str(directory / "model.ts")
        _, outputs_schema = export.export_torchscript(model, traced_image, path)
        exported = torch.jit.load(path)  # from the file, as a deployment would
    else:
        path = str(directory / "model.onnx")
        outputs_schema = export.export_onnx(model, traced_image, path)
        exported = export.onnx_session(path)
    return lambda image: export.run_exported(exported, outputs_schema, image)


def assert_final_instances_close(actual, expected):
    """Instances at the original size: the same detections; thresholded masks may differ at a few
    pixels where the soft mask is within rounding of the threshold."""
    assert actual.image_size == expected.image_size
    assert len(actual) == len(expected) > 0
    torch.testing.assert_close(actual.pred_boxes.tensor, expected.pred_boxes.tensor, atol=1e-2, rtol=0)
    torch.testing.assert_close(actual.scores, expected.scores, atol=1e-5, rtol=1e-4)
    assert torch.equal(actual.pred_classes, expected.pred_classes)
    assert actual.has("pred_masks") == expected.has("pred_masks")
    if not expected.has("pred_masks"):
        return
    assert actual.pred_masks.dtype == expected.pred_masks.dtype == torch.bool
    assert expected.pred_masks.any()  # the comparison below has pixels to compare
    assert (actual.pred_masks != expected.pred_masks).float().mean() < 1e-3


@pytest.mark.parametrize("export_format", export.EXPORT_FORMATS)
@pytest.mark.parametrize("name", sorted(MODELS))
def test_export_equals_eager_on_an_image_of_another_size(name, export_format, tmp_path):
    cfg, model = _model(name)
    first, second = dataset_batch(cfg, is_train=False, indices=(0, 1))
    assert first["image"].shape != second["image"].shape
    expected = _eager(model, second["image"])
    assert len(expected) > 0 and len(expected) != len(_eager(model, first["image"])), \
        "the test needs detections, and other counts on the two images: adjust the score threshold"

    run_exported = _export(model, export_format, first["image"], tmp_path)
    actual = run_exported(second["image"])
    assert_instances_allclose(actual, expected, rtol=1e-4, msg=f"{name} exported to {export_format}:")
    # A uniform image at the pixel mean (a third size): no detection, in eager mode and exported.
    blank = torch.full((3, 136, 160), 128, dtype=torch.uint8)
    expected_empty, actual_empty = _eager(model, blank), run_exported(blank)
    assert len(expected_empty) == len(actual_empty) == 0
    assert actual_empty.image_size == expected_empty.image_size == (136, 160)
    assert actual_empty.get_fields().keys() == expected_empty.get_fields().keys()

    final = export.postprocess(model, actual, second["height"], second["width"])
    assert final.image_size == (second["height"], second["width"])
    if name in RESIZES_LIKE_EAGER:
        with torch.no_grad():
            assert_final_instances_close(final, model([second])[0]["instances"])


def test_soft_nms_is_a_clear_export_error():
    _, model = _model("nlroi_mask_rcnn", ["MODEL.ROI_HEADS.SOFT_NMS.ENABLED", True])
    image = torch.zeros(3, 64, 64, dtype=torch.uint8)
    with pytest.raises(ValueError, match="MODEL.ROI_HEADS.SOFT_NMS.ENABLED"):
        export.export_torchscript(model, image)


def test_greedy_mask_nms_is_a_clear_export_error(tmp_path):
    _, model = _model("solo", ["MODEL.SOLO.NMS_TYPE", "mask"])
    image = torch.zeros(3, 64, 64, dtype=torch.uint8)
    with pytest.raises(ValueError, match="NMS_TYPE 'matrix'"):
        export.export_onnx(model, image, str(tmp_path / "model.onnx"))


def test_training_mode_is_a_clear_export_error():
    _, model = _model("fcos")
    with pytest.raises(ValueError, match="model.eval()"):
        export.export_torchscript(model.train(), torch.zeros(3, 64, 64, dtype=torch.uint8))


def _export_model_script():
    return load_script("projects/export_model.py")


@pytest.mark.parametrize("method, export_format, message", [
    ("caffe2_tracing", "caffe2", "--export-method caffe2_tracing is not supported"),
    ("scripting", "torchscript", "--export-method scripting is not supported"),
    ("tracing", "caffe2", "--format caffe2 is not supported"),
])
def test_cli_names_unsupported_methods_and_formats(method, export_format, message):
    with pytest.raises(SystemExit, match=message):
        _export_model_script().check_method(method, export_format)


def test_cli_sample_image_is_resized_as_at_test_time_and_an_unreadable_one_is_named(tmp_path):
    good, bad = str(tmp_path / "grey.png"), str(tmp_path / "broken.png")
    Image.fromarray(np.full((40, 60), 200, np.uint8)).save(good)  # greyscale: replicated to 3 channels
    with open(bad, "wb") as f:
        f.write(b"not an image")
    cfg = tiny_cfg(config_path("quickstart/fcos_R18_synthetic.yaml"),
                   ["INPUT.MIN_SIZE_TEST", 80, "INPUT.MAX_SIZE_TEST", 200])
    script = _export_model_script()
    image = script.sample_image(cfg, good)
    assert image.dtype == torch.uint8 and tuple(image.shape) == (3, 80, 120)
    assert int(image.min()) == int(image.max()) == 200
    with pytest.raises(OSError, match=re.escape(f"cannot read image '{bad}'")):
        script.sample_image(cfg, bad)


def test_cli_exports_and_evaluates(tmp_path):
    """``projects/export_model.py --run-eval`` on the mini split: ``model.ts`` written, its detections
    evaluated with the COCO evaluator."""
    config, options = MODELS["condinst"]
    out = str(tmp_path)
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO_ROOT, "projects", "export_model.py"),
         "--config-file", config_path(f"quickstart/{config}"), "--export-method", "tracing",
         "--format", "torchscript", "--run-eval", "--output", out,
         "DATASETS.TEST", "('synthetic_shapes_mini_val',)", *map(str, SMALL + options)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-5000:]
    assert os.path.exists(os.path.join(out, "model.ts"))
    log = proc.stdout + proc.stderr
    assert "Evaluation results for bbox" in log and "Evaluation results for segm" in log
    with open(os.path.join(out, "coco_instances_results.json")) as f:
        detections = json.load(f)
    assert len(detections) > 0 and all("segmentation" in d for d in detections)
