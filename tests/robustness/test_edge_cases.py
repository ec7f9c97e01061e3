"""Edge cases in training and inference for every meta-architecture of the repository (issue 8): images
without annotations, a batch mixing an empty and a crowded image, zero detections, degenerate ground truth,
tiny and large images, NaN / inf losses in the trainer, and per-image independence of the predictions.

Every model is its quick-start config (``configs/quickstart/``) made test-sized through opts."""
import copy
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from detectron2.data import DatasetCatalog
from detectron2.structures import ImageList
from detectron2.utils.events import EventStorage

from d2ext.engine import Trainer
from d2ext.layers import padded_bitmasks
from d2ext.testing import (assert_instance_predictions, assert_prediction_fields, build_tiny_model, config_path,
                           map_records, tiny_cfg, train_step, visible_blendmask_masks)

DATASET = "synthetic_shapes_mini_train"
CROWDED_INDEX = 9  # 8 instances, several touching or overlapping
COMMON = ["INPUT.MIN_SIZE_TEST", 96, "INPUT.MAX_SIZE_TEST", 144, "TEST.DETECTIONS_PER_IMAGE", 20]
FCOS_TOWERS = ["MODEL.FCOS.NUM_CLS_CONVS", 1, "MODEL.FCOS.NUM_BOX_CONVS", 1, "MODEL.FCOS.POST_NMS_TOPK_TEST", 20]
SOLO_SMALL = ["MODEL.SOLO.NUM_INSTANCE_CONVS", 1, "MODEL.SOLO.MAX_PER_IMG", 20]

# name: (quick-start config, test-sized opts, score-threshold key, opts that let every candidate through)
MODELS = {
    "nlroi_mask_rcnn": ("nlroi_mask_rcnn_R18_FPN_synthetic.yaml",
                        ["MODEL.RPN.POST_NMS_TOPK_TEST", 60, "MODEL.RPN.POST_NMS_TOPK_TRAIN", 60,
                         "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", 32],
                        "MODEL.ROI_HEADS.SCORE_THRESH_TEST", []),
    "fcos": ("fcos_R18_synthetic.yaml", FCOS_TOWERS, "MODEL.FCOS.INFERENCE_TH_TEST", []),
    "condinst": ("condinst_R18_synthetic.yaml", [*FCOS_TOWERS, "MODEL.CONDINST.MASK_BRANCH.NUM_CONVS", 1],
                 "MODEL.FCOS.INFERENCE_TH_TEST", []),
    "blendmask": ("blendmask_R18_synthetic.yaml",
                  [*FCOS_TOWERS, "MODEL.BASIS_MODULE.NUM_CONVS", 1, "MODEL.BASIS_MODULE.CONVS_DIM", 32],
                  "MODEL.FCOS.INFERENCE_TH_TEST", []),
    "solo": ("solo_R18_FPN_synthetic.yaml", [*SOLO_SMALL, "MODEL.SOLO.VARIANT", "SOLO"], "MODEL.SOLO.SCORE_THR",
             ["MODEL.SOLO.UPDATE_THR", 0.0, "MODEL.SOLO.MASK_THR", 1e-5]),
    "decoupled_solo": ("solo_R18_FPN_synthetic.yaml", [*SOLO_SMALL, "MODEL.SOLO.VARIANT", "DecoupledSOLO"],
                       "MODEL.SOLO.SCORE_THR", ["MODEL.SOLO.UPDATE_THR", 0.0, "MODEL.SOLO.MASK_THR", 1e-5]),
    "solov2": ("solov2_R18_FPN_synthetic.yaml", ["MODEL.SOLOV2.NUM_INSTANCE_CONVS", 1, "MODEL.SOLOV2.MAX_PER_IMG", 20],
               "MODEL.SOLOV2.SCORE_THR", ["MODEL.SOLOV2.UPDATE_THR", 0.0, "MODEL.SOLOV2.MASK_THR", 1e-5]),
    "rdsnet": ("rdsnet_R18_FPN_synthetic.yaml", ["MODEL.RETINANET.NUM_CONVS", 2],
               "MODEL.RETINANET.SCORE_THRESH_TEST", []),
    "rdsnet_fcos": ("rdsnet_fcos_R18_synthetic.yaml", FCOS_TOWERS,
                    "MODEL.FCOS.INFERENCE_TH_TEST", []),
}
parametrize_models = pytest.mark.parametrize("name", list(MODELS))
# With every cell a candidate (untrained model, thresholds 0), the SOLO family forms a mask for each cell
# and class before Matrix NMS, as the references do: GBs at 2000 px with the quick-start grids.
LARGE_IMAGE_OPTS = {name: [f"MODEL.{node}.NUM_GRIDS", [8, 6, 5, 4, 3]]
                    for name, node in (("solo", "SOLO"), ("decoupled_solo", "SOLO"), ("solov2", "SOLOV2"))}


def sized_cfg(name, threshold=None, opts=()):
    """The test-sized config of model ``name``; ``threshold``: its test score threshold (0.0 also lowers
    the other inference thresholds so that an untrained model detects something everywhere)."""
    config, small, score_key, accept_all = MODELS[name]
    extra = []
    if threshold is not None:
        extra = [score_key, threshold, *(accept_all if threshold == 0.0 else [])]
    return tiny_cfg(config_path("quickstart/" + config), [*COMMON, *small, *extra, *opts])


def _records(indices):
    return [copy.deepcopy(DatasetCatalog.get(DATASET)[i]) for i in indices]


def _empty(record):
    return {**record, "annotations": []}


def _crowded(record, shift=3.0):
    """``record`` plus a copy of each annotation shifted by ``shift`` px: pairs of strongly overlapping
    instances of the same class."""
    copies = []
    for ann in record["annotations"]:
        shifted = copy.deepcopy(ann)
        shifted["bbox"] = [v + shift for v in ann["bbox"]]
        shifted["segmentation"] = [[v + shift for v in polygon] for polygon in ann["segmentation"]]
        copies.append(shifted)
    return {**record, "annotations": record["annotations"] + copies}


def _assert_finite_training(model, batch):
    """One train step: every loss finite, every gradient finite."""
    losses = train_step(model, batch)
    assert losses and all(np.isfinite(v) for v in losses.values()), losses
    bad = [n for n, p in model.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
    assert not bad, bad
    return losses


@parametrize_models
def test_train_on_images_without_annotations(name):
    cfg = sized_cfg(name)
    batch = map_records(cfg, [_empty(r) for r in _records((0, 1))])
    assert all(len(x["instances"]) == 0 for x in batch)
    _assert_finite_training(build_tiny_model(cfg), batch)


@parametrize_models
def test_train_on_empty_and_crowded_images(name):
    cfg = sized_cfg(name)
    empty, crowded = _records((0, CROWDED_INDEX))
    batch = map_records(cfg, [_empty(empty), _crowded(crowded)])
    assert len(batch[1]["instances"]) == 2 * len(crowded["annotations"])
    _assert_finite_training(build_tiny_model(cfg), batch)


def _inference(model, inputs):
    model.eval()
    with torch.no_grad():
        return [out["instances"] for out in model(inputs)]


def _test_inputs(cfg, indices):
    return map_records(cfg, _records(indices), is_train=False)


@parametrize_models
def test_inference_without_detections(name):
    cfg = sized_cfg(name, threshold=1.0)
    inputs = _test_inputs(cfg, (0, 1))
    for x, instances in zip(inputs, _inference(build_tiny_model(cfg), inputs)):
        assert len(instances) == 0
        assert_prediction_fields(instances, x["height"], x["width"], masks=cfg.MODEL.MASK_ON)


def _degenerate(record):
    """``record`` plus degenerate annotations of class 0 (in this order): a zero-width box (with a valid
    polygon), a polygon that covers no pixel (with a valid box), an instance without any polygon, and
    a 6 x 6 px object (2.5 px after the test resize: smaller than every model's stride)."""
    polygon = [10.0, 10.0, 40.0, 10.0, 40.0, 40.0, 10.0, 40.0]
    base = {"bbox_mode": record["annotations"][0]["bbox_mode"], "category_id": 0, "iscrowd": 0}
    degenerate = [
        {**base, "bbox": [10.0, 10.0, 10.0, 40.0], "segmentation": [polygon]},
        {**base, "bbox": [10.0, 10.0, 40.0, 40.0], "segmentation": [[20.0, 20.0, 20.3, 20.0, 20.0, 20.3]]},
        {**base, "bbox": [10.0, 10.0, 40.0, 40.0], "segmentation": []},
        {**base, "bbox": [50.0, 50.0, 56.0, 56.0], "segmentation": [[50.0, 50.0, 56.0, 50.0, 56.0, 56.0, 50.0, 56.0]]},
    ]
    return {**record, "annotations": record["annotations"] + degenerate}


def _mask_pixels(instances):
    """(N,) pixels of each ground-truth mask at the input size."""
    return padded_bitmasks(instances.gt_masks, instances.image_size).flatten(1).sum(dim=1)


@pytest.mark.parametrize("mask_format", ["polygon", "bitmask"])
def test_mapper_drops_zero_area_boxes_and_empty_masks(mask_format):
    """What reaches the models from the Trainer's mapper: Detectron2's ``filter_empty_instances`` drops
    zero-area boxes and instances without any polygon or mask pixel; a polygon too small to cover a
    pixel is only dropped for bitmasks (``PolygonMasks`` count polygons, not pixels)."""
    cfg = sized_cfg("solo", opts=["INPUT.MASK_FORMAT", mask_format])
    record = _records((1,))[0]
    instances = map_records(cfg, [_degenerate(record)])[0]["instances"]
    num_valid = len(record["annotations"])
    pixels = _mask_pixels(instances)
    assert instances.gt_boxes.nonempty().all()
    assert (pixels[:num_valid] > 0).all()
    if mask_format == "polygon":  # the pixel-less polygon and the small object
        assert pixels[num_valid:].tolist() == [0, pixels[-1]] and pixels[-1] > 0
    else:  # the small object
        assert len(pixels) == num_valid + 1 and pixels[-1] > 0


@parametrize_models
def test_train_with_degenerate_ground_truth(name):
    """What the mapper lets through (polygon format, as in the quick-start configs): an instance whose
    mask has no pixel and one smaller than a stride; both images train with finite losses."""
    cfg = sized_cfg(name)
    batch = map_records(cfg, [_degenerate(r) for r in _records((1, CROWDED_INDEX))])
    if cfg.MODEL.MASK_ON:
        assert all((_mask_pixels(x["instances"]) == 0).sum() == 1 for x in batch)
    _assert_finite_training(build_tiny_model(cfg), batch)


@pytest.mark.parametrize("mask_format", ["polygon", "bitmask"])
@pytest.mark.parametrize("size", [2, 4, 5])
def test_polygon_with_fewer_than_3_points_is_a_clear_error(mask_format, size, tmp_path):
    """The training loader of ``d2ext.engine.Trainer`` names the image, annotation and polygon (Detectron2
    alone fails in pycocotools or numpy for bitmasks and odd lengths, or names no annotation)."""
    name = f"edge_cases_bad_polygon_{mask_format}_{size}"
    record = _records((1,))[0]
    record["annotations"][1]["segmentation"] = [list(range(size))]
    DatasetCatalog.register(name, lambda: [record])
    try:
        cfg = sized_cfg("solo", opts=["INPUT.MASK_FORMAT", mask_format, "DATASETS.TRAIN", (name,),
                                      "SOLVER.IMS_PER_BATCH", 1])
        message = f"{re.escape(record['file_name'])}: annotation 1 .* polygon 0 of {size} coordinates"
        with pytest.raises(ValueError, match=message):
            next(iter(Trainer.build_train_loader(cfg)))
    finally:
        DatasetCatalog.remove(name)


def _resized(x, height, width):
    """A test input whose image is ``x``'s resized to height x width (output size = input size)."""
    image = F.interpolate(x["image"][None].float(), size=(height, width), mode="bilinear", align_corners=False)
    return {"image": image[0].round().clamp(0, 255).to(torch.uint8), "height": height, "width": width}


def _assert_valid_predictions(cfg, instances, height, width):
    assert len(instances) > 0
    assert_prediction_fields(instances, height, width, masks=cfg.MODEL.MASK_ON)
    if cfg.MODEL.MASK_ON:
        assert_instance_predictions(instances, height, width)
    boxes = instances.pred_boxes.tensor
    assert torch.isfinite(boxes).all() and torch.isfinite(instances.scores).all()
    assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= width).all() and (boxes[:, 3] <= height).all()


@parametrize_models
@pytest.mark.parametrize("size", [(32, 32), (2000, 1000)], ids=["tiny", "large"])
def test_inference_on_tiny_and_large_images(name, size):
    cfg = sized_cfg(name, threshold=0.0, opts=LARGE_IMAGE_OPTS.get(name, []) if size[0] > 1000 else [])
    x = _resized(_test_inputs(cfg, (1,))[0], *size)
    _assert_valid_predictions(cfg, _inference(build_tiny_model(cfg), [x])[0], *size)


EMPTY_IMAGES = {"no_rows": (3, 0, 40), "no_columns": (3, 40, 0), "no_channels": (40, 40)}


def _empty_image_error(name, shape):
    if name == "nlroi_mask_rcnn":
        # Detectron2's GeneralizedRCNN with NL-RoI ROI heads, which see only the image sizes (GeneralizedRCNN
        # would fail rescaling the detections by a zero size). A greyscale (H, W) tensor is Detectron2's
        # business there: its normalisation broadcasts it to 3 channels.
        return f"input 1: the image has no pixels (size {shape[1]} x {shape[2]})"
    return f"input 1: 'image' must be a (C, H, W) tensor with C, H, W > 0, got shape {shape}"


@pytest.mark.parametrize("name, shape", [
    pytest.param(name, shape, id=f"{name}-{case}") for name in MODELS for case, shape in EMPTY_IMAGES.items()
    if not (name == "nlroi_mask_rcnn" and case == "no_channels")])
def test_an_image_without_pixels_or_channels_is_an_error_naming_the_input(name, shape):
    cfg = sized_cfg(name)
    model = build_tiny_model(cfg)
    inputs = _test_inputs(cfg, (0,)) + [{"image": torch.zeros(shape, dtype=torch.uint8), "height": 40, "width": 40}]
    message = re.escape(_empty_image_error(name, shape))
    with pytest.raises(ValueError, match=message):
        _inference(model, inputs)
    train_inputs = map_records(cfg, _records((0,)))
    train_inputs.append({**train_inputs[0], "image": torch.zeros(shape, dtype=torch.uint8)})
    with pytest.raises(ValueError, match=message):
        train_step(model, train_inputs)


@pytest.mark.parametrize("name, channels", [
    pytest.param(name, channels, id=f"{name}-{channels}") for name in MODELS for channels in (1, 4)
    if name != "nlroi_mask_rcnn"])  # Detectron2's GeneralizedRCNN: its normalisation, its messages
def test_an_image_with_other_channels_than_the_pixel_mean_is_an_error(name, channels):
    cfg = sized_cfg(name)
    model = build_tiny_model(cfg)
    shape = (channels, 40, 40)
    inputs = _test_inputs(cfg, (0,)) + [{"image": torch.zeros(shape, dtype=torch.uint8), "height": 40, "width": 40}]
    message = re.escape(f"input 1: 'image' has {channels} channels, the model normalises 3 (MODEL.PIXEL_MEAN / "
                        f"PIXEL_STD), got shape {shape}")
    with pytest.raises(ValueError, match=message):
        _inference(model, inputs)


def _cropped(x, height, width):
    return {"image": x["image"][:, :height, :width], "height": height, "width": width}


def _padded_size(model, inputs):
    images = ImageList.from_tensors([x["image"] for x in inputs], model.backbone.size_divisibility)
    return tuple(images.tensor.shape[-2:])


def _assert_same_predictions(a, b):
    assert len(a) == len(b) > 0
    assert a.image_size == b.image_size
    assert torch.equal(a.pred_classes, b.pred_classes)
    torch.testing.assert_close(a.scores, b.scores, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(a.pred_boxes.tensor, b.pred_boxes.tensor, rtol=1e-4, atol=1e-2)
    if a.has("pred_masks"):
        assert a.pred_masks.any()
        mismatch = (a.pred_masks != b.pred_masks).float().mean()
        assert mismatch < 1e-3, float(mismatch)


@parametrize_models
def test_predictions_do_not_depend_on_the_batch(name):
    """An image's predictions alone equal its predictions in a batch with an image of another size.

    The sizes are chosen so that both images pad to the same batch tensor alone and together: a
    convolution's output near an image's border depends on how far the padding extends (Detectron2's
    own models too), so only then can the predictions be compared exactly. What is checked is that
    nothing mixes the images of a batch and that each image's own size (not the padded one) is used."""
    cfg = sized_cfg(name, threshold=0.0)
    model = build_tiny_model(cfg).eval()
    if name == "blendmask":
        visible_blendmask_masks(model)
    full, other = _test_inputs(cfg, (1, 2))
    a, b = _cropped(full, 96, 128), _cropped(other, 72, 100)
    assert _padded_size(model, [a]) == _padded_size(model, [b]) == _padded_size(model, [a, b])
    batch = _inference(model, [a, b])
    _assert_same_predictions(_inference(model, [a])[0], batch[0])
    _assert_same_predictions(_inference(model, [b])[0], batch[1])


NUMBER = r"(np\.float64\()?{}"  # a value in Detectron2's loss-dict message (NumPy 2 prints the type)


def _trainer(name, directory):
    """``d2ext.engine.Trainer`` (as ``projects/train_net.py`` builds it) of a test-sized model on the mini split."""
    return Trainer(sized_cfg(name, opts=["OUTPUT_DIR", str(directory), "DATASETS.TRAIN", (DATASET,),
                                         "DATASETS.TEST", (), "SOLVER.IMS_PER_BATCH", 2,
                                         "INPUT.MIN_SIZE_TRAIN", (96,), "INPUT.MAX_SIZE_TRAIN", 144]))


def _run_step_raises_floating_point_error(trainer):
    """``trainer.run_step()`` raises a FloatingPointError before the optimizer changes any weight;
    returns its message."""
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    with EventStorage(0) as trainer.storage, pytest.raises(FloatingPointError) as error:
        trainer.run_step()
    for n, p in trainer.model.named_parameters():
        torch.testing.assert_close(p.detach(), before[n], rtol=0, atol=0, equal_nan=True, msg=n)
    return str(error.value)


@parametrize_models
def test_diverged_weights_raise_floating_point_error(name, tmp_path):
    """NaN in the first conv (as after a divergence) makes every prediction NaN: training stops with a
    FloatingPointError naming the losses (Detectron2's ``SimpleTrainer``, or the model for a loss it
    cannot compute from NaN boxes); Detectron2's RPN raises its own first in the two-stage model."""
    trainer = _trainer(name, tmp_path)
    with torch.no_grad():
        trainer.model.backbone.bottom_up.stem.conv1.weight[0, 0, 0, 0] = float("nan")
    message = _run_step_raises_floating_point_error(trainer)
    named = rf"'loss_\w+': {NUMBER.format('nan')}|loss_\w+: .* Inf/NaN"
    assert re.search(rf"{named}|Predicted boxes or scores contain Inf/NaN", message), message


def test_a_non_finite_loss_is_named(tmp_path, monkeypatch):
    """One infinite loss among finite ones: the trainer's FloatingPointError names it with its value."""
    trainer = _trainer("fcos", tmp_path)
    forward = trainer.model.forward

    def forward_with_infinite_loss(batched_inputs):
        losses = forward(batched_inputs)
        losses["loss_fcos_ctr"] = losses["loss_fcos_ctr"] * float("inf")
        return losses

    monkeypatch.setattr(trainer.model, "forward", forward_with_infinite_loss)
    message = _run_step_raises_floating_point_error(trainer)
    assert re.search(rf"'loss_fcos_ctr': {NUMBER.format('inf')}", message), message
    assert not re.search(rf"'loss_fcos_(cls|loc)': {NUMBER.format('(nan|inf)')}", message), message
