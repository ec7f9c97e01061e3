"""MBRM as a post-processor of other models: the generic refinement against a per-detection loop, the
profiles of pasted RoI masks from their windows against full-image pastes, and the models with RoI masks
end to end: Mask R-CNN with MBRM (``GeneralizedRCNNWithMBRM``) against plain ``GeneralizedRCNN``, BlendMask
with ``MODEL.MBRM.ENABLED`` against BlendMask without."""
import os
import re

import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.layers import paste_masks_in_image
from detectron2.modeling.postprocessing import detector_postprocess
from detectron2.structures import Boxes, Instances

from d2ext.testing import (assert_prediction_fields, build_tiny_model, config_path, dataset_batch, predict,
                           soft_paste_reference, tiny_cfg, train_step, visible_blendmask_masks)
from rdsnet_d2 import MBRM, GeneralizedRCNNWithMBRM, refine_instances_with_mbrm
from rdsnet_d2.mbrm import OFFICIAL_KERNEL
from rdsnet_d2.mbrm_postprocess import pasted_mask_profiles

PLAIN = "quickstart/mask_rcnn_R18_FPN_synthetic.yaml"
WITH_MBRM = "quickstart/mask_rcnn_R18_FPN_mbrm_synthetic.yaml"
BLENDMASK = "quickstart/blendmask_R18_synthetic.yaml"
BLENDMASK_WITH_MBRM = "quickstart/blendmask_R18_synthetic_mbrm.yaml"
# Small images; every RoI passes the score threshold, so untrained models still detect.
OPTS = ["INPUT.MIN_SIZE_TEST", "96", "INPUT.MAX_SIZE_TEST", "128", "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0",
        "TEST.DETECTIONS_PER_IMAGE", "20", "MODEL.MBRM.MASK_CHUNK_SIZE", "7"]
# Small BlendMask (as tests/adet_lite/test_blendmask.py), every FCOS candidate kept.
BLENDMASK_OPTS = ["INPUT.MIN_SIZE_TEST", "96", "INPUT.MAX_SIZE_TEST", "144", "MODEL.FCOS.NUM_CLS_CONVS", "1",
                  "MODEL.FCOS.NUM_BOX_CONVS", "1", "MODEL.BASIS_MODULE.NUM_CONVS", "1",
                  "MODEL.BASIS_MODULE.CONVS_DIM", "32", "MODEL.FCOS.INFERENCE_TH_TEST", "0.0"]


def _instances(num, height=20, width=30, seed=0):
    generator = torch.Generator().manual_seed(seed)
    masks = torch.rand(num, height, width, generator=generator) ** 4  # mostly background, some edges
    for i in range(num):  # a solid object per detection, so that sides have an edge to move to
        masks[i, 3 + i: 12 + i, 4 + 2 * i: 20 + i] = 0.9
    boxes = torch.tensor([[5.0 + 2 * i, 2.0 + i, 18.0 + i, 13.0 + i] for i in range(num)]).view(num, 4)
    instances = Instances((height, width), pred_boxes=Boxes(boxes), scores=torch.rand(num, generator=generator),
                          pred_classes=torch.arange(num))
    return instances, masks


def test_refine_instances_matches_per_detection_loop():
    mbrm = MBRM()
    instances, masks = _instances(5)
    boxes_before = instances.pred_boxes.tensor.clone()
    refined = refine_instances_with_mbrm(mbrm, instances, masks)
    expected = torch.cat([mbrm(masks[i: i + 1], boxes_before[i: i + 1]) for i in range(5)])
    assert torch.equal(refined.pred_boxes.tensor, expected)
    assert not torch.equal(expected, boxes_before)  # the masks do move some sides
    assert torch.equal(instances.pred_boxes.tensor, boxes_before)  # the input is not modified
    assert refined.scores is instances.scores and refined.pred_classes is instances.pred_classes
    # chunks in detection order give the same result as the whole tensor
    chunked = refine_instances_with_mbrm(mbrm, instances, iter([masks[:2], masks[2:3], masks[3:]]))
    assert torch.equal(chunked.pred_boxes.tensor, expected)


def test_refine_instances_empty_and_bad_sizes():
    mbrm = MBRM()
    empty, _ = _instances(0)
    assert len(refine_instances_with_mbrm(mbrm, empty, [])) == 0
    assert refine_instances_with_mbrm(mbrm, empty, torch.zeros(0, 20, 30)).pred_boxes.tensor.shape == (0, 4)
    instances, masks = _instances(3)
    with pytest.raises(ValueError, match="image size"):
        refine_instances_with_mbrm(mbrm, instances, masks[:, :, :-1])
    with pytest.raises(ValueError, match="3 boxes but 2"):
        refine_instances_with_mbrm(mbrm, instances, masks[:2])


# Boxes in a 60 x 120 image: sub-pixel, fractional, touching the borders, the whole image, and one 100 px
# wide (index 4), whose fringe (half a RoI cell: 1.8 px at M = 28) reaches beyond the box grown by 1 px.
VARIED_BOXES = torch.tensor([
    [10.3, 4.7, 10.9, 5.1], [0.0, 0.0, 7.5, 6.2], [95.2, 40.1, 120.0, 60.0], [0.0, 0.0, 120.0, 60.0],
    [10.0, 5.0, 110.0, 55.0], [20.0, 30.0, 31.0, 60.0], [61.6, 0.0, 89.4, 12.8], [1.0, 12.0, 80.0, 19.0],
])


@pytest.mark.parametrize("mask_size", [28, 7])
def test_pasted_mask_profiles_equal_full_image_profiles(mask_size):
    torch.manual_seed(0)
    roi_masks = torch.rand(len(VARIED_BOXES), mask_size, mask_size)
    roi_masks[:, :, 0] = roi_masks[:, :, -1] = roi_masks[:, 0] = roi_masks[:, -1] = 1.0  # a strong fringe
    x_expected, y_expected = MBRM.profiles(soft_paste_reference(roi_masks, VARIED_BOXES, (60, 120)))
    for chunk_size in (1, 3, len(VARIED_BOXES)):
        x_profiles, y_profiles = pasted_mask_profiles(roi_masks, VARIED_BOXES, (60, 120), chunk_size)
        assert torch.equal(x_profiles, x_expected) and torch.equal(y_profiles, y_expected), chunk_size
    # Column 8 is in the fringe of box 4 (x1 = 10), outside the box grown by 1 px.
    assert x_expected[4, 8] > 0 and x_expected[4, :3].max() == 0


def test_pasted_mask_profiles_equal_detectron2_cpu_paste_for_small_boxes():
    """On CPU, Detectron2 pastes each mask on its box grown by 1 px: the same as the full paste for boxes
    up to 2 M px wide, where the fringe is at most 1 px."""
    torch.manual_seed(1)
    boxes = torch.tensor([[10.3, 4.7, 10.9, 5.1], [0.0, 0.0, 7.5, 6.2], [40.2, 20.1, 90.0, 60.0],
                          [5.5, 30.0, 61.4, 59.9]])
    roi_masks = torch.rand(4, 28, 28)
    soft = paste_masks_in_image(roi_masks, boxes, (60, 90), threshold=-1).float() / 255
    expected = MBRM.profiles(soft)
    profiles = pasted_mask_profiles(roi_masks, boxes, (60, 90), chunk_size=2)
    assert torch.equal(profiles[0], expected[0]) and torch.equal(profiles[1], expected[1])
    assert (soft.flatten(1).amax(dim=1)[1:] > 0).all()  # box 0 covers no pixel centre


def test_pasted_mask_profiles_without_masks_and_bad_chunk_size():
    x_profiles, y_profiles = pasted_mask_profiles(torch.zeros(0, 28, 28), torch.zeros(0, 4), (20, 30))
    assert x_profiles.shape == (0, 30) and y_profiles.shape == (0, 20)
    with pytest.raises(ValueError, match="chunk_size"):
        pasted_mask_profiles(torch.rand(2, 28, 28), VARIED_BOXES[:2], (60, 120), chunk_size=0)


def _reference_outputs(plain, inputs, mbrm):
    """The boxes of a plain model's outputs (Mask R-CNN, BlendMask: RoI masks pasted by Detectron2's
    ``detector_postprocess``) refined one detection at a time from masks pasted one detection at a time over
    the whole image (``soft_paste_reference``)."""
    with torch.no_grad():
        raw = plain.inference(inputs, do_postprocess=False)
    outputs = []
    for result, inp in zip(raw, inputs):
        result.roi_masks = result.pred_masks[:, 0]
        result = detector_postprocess(result, inp["height"], inp["width"])
        boxes = []
        for i in range(len(result)):
            box = result.pred_boxes.tensor[i: i + 1]
            boxes.append(mbrm(soft_paste_reference(result.roi_masks[i: i + 1], box, result.image_size), box))
        outputs.append(torch.cat(boxes))
    return outputs


def assert_refined_like_reference(plain, model, inputs):
    """``model`` (MBRM on) has ``plain``'s weights (besides MBRM's): same masks, scores and classes as
    ``plain``, boxes those of ``_reference_outputs``, some of them moved. Returns the detection counts."""
    incompatible = model.load_state_dict(plain.state_dict(), strict=False)
    assert incompatible.missing_keys == ["mbrm.weight", "mbrm.bias"] and not incompatible.unexpected_keys
    plain.eval(), model.eval()
    with torch.no_grad():
        expected, refined = plain(inputs), model(inputs)
    reference_boxes = _reference_outputs(plain, inputs, model.mbrm)
    moved, counts = 0, []
    for inp, exp, out, boxes in zip(inputs, expected, refined, reference_boxes):
        exp, out = exp["instances"], out["instances"]
        assert out.image_size == (inp["height"], inp["width"])
        assert set(out.get_fields()) == set(exp.get_fields())
        for field in ("scores", "pred_classes", "pred_masks"):
            assert torch.equal(out.get(field), exp.get(field)), field
        assert torch.equal(out.pred_boxes.tensor, boxes)
        moved += int((out.pred_boxes.tensor != exp.pred_boxes.tensor).sum())
        counts.append(len(out))
    assert moved > 0
    return counts


def test_mask_rcnn_with_mbrm_end_to_end():
    plain = build_tiny_model(tiny_cfg(config_path(PLAIN), OPTS))
    model = build_tiny_model(tiny_cfg(config_path(WITH_MBRM), OPTS))
    assert isinstance(model, GeneralizedRCNNWithMBRM) and isinstance(model.mbrm, MBRM)
    inputs = dataset_batch(tiny_cfg(config_path(PLAIN), OPTS), is_train=False)
    assert assert_refined_like_reference(plain, model, inputs) == [20, 20]


def test_mask_rcnn_with_mbrm_names_an_image_without_pixels():
    model = build_tiny_model(tiny_cfg(config_path(WITH_MBRM), OPTS)).eval()
    inputs = [{"image": torch.zeros(3, 0, 40, dtype=torch.uint8), "height": 40, "width": 40}]
    with pytest.raises(ValueError, match=re.escape("input 0: 'image' must be a (C, H, W) tensor with C, H, W > 0, "
                                                   "got shape (3, 0, 40)")):
        model(inputs)


def test_mask_rcnn_with_mbrm_off_trains_and_loads_like_mask_rcnn(tmp_path):
    opts = OPTS + ["MODEL.MBRM.ENABLED", "False"]
    plain = build_tiny_model(tiny_cfg(config_path(PLAIN), opts))
    model = build_tiny_model(tiny_cfg(config_path(WITH_MBRM), opts))
    assert model.mbrm is None
    batch = dataset_batch(tiny_cfg(config_path(PLAIN), opts), indices=(0,))
    torch.manual_seed(3)
    plain_losses = train_step(plain, batch)
    torch.manual_seed(3)
    assert train_step(model, batch) == plain_losses  # training is Mask R-CNN's, untouched
    plain.eval(), model.eval()
    with torch.no_grad():
        a, b = plain(batch)[0]["instances"], model(batch)[0]["instances"]
    assert torch.equal(a.pred_boxes.tensor, b.pred_boxes.tensor) and torch.equal(a.pred_masks, b.pred_masks)
    # a plain Mask R-CNN checkpoint loads into the MBRM variant; MBRM keeps the released constants
    DetectionCheckpointer(plain, save_dir=str(tmp_path)).save("plain")
    with_mbrm = build_tiny_model(tiny_cfg(config_path(WITH_MBRM), OPTS), seed=1)
    DetectionCheckpointer(with_mbrm).load(os.path.join(str(tmp_path), "plain.pth"))
    assert torch.equal(with_mbrm.mbrm.weight.flatten(), torch.tensor(OFFICIAL_KERNEL))
    assert torch.equal(with_mbrm.backbone.bottom_up.stem.conv1.weight, plain.backbone.bottom_up.stem.conv1.weight)


@pytest.mark.parametrize("config", [WITH_MBRM, BLENDMASK_WITH_MBRM])
def test_mbrm_config_errors(config):
    with pytest.raises(ValueError, match="MBRM.ENABLED .* set MODEL.MASK_ON True"):
        build_tiny_model(tiny_cfg(config_path(config), ["MODEL.MASK_ON", "False"]))
    with pytest.raises(ValueError, match="MODEL.MBRM.MASK_CHUNK_SIZE"):
        build_tiny_model(tiny_cfg(config_path(config), ["MODEL.MBRM.MASK_CHUNK_SIZE", "0"]))


def test_blendmask_with_mbrm_end_to_end():
    plain = visible_blendmask_masks(build_tiny_model(tiny_cfg(config_path(BLENDMASK), BLENDMASK_OPTS)))
    model = build_tiny_model(tiny_cfg(config_path(BLENDMASK_WITH_MBRM), BLENDMASK_OPTS))  # gets plain's weights
    assert isinstance(model.mbrm, MBRM) and not any(p.requires_grad for p in model.mbrm.parameters())
    inputs = dataset_batch(tiny_cfg(config_path(BLENDMASK), BLENDMASK_OPTS), is_train=False)
    assert min(assert_refined_like_reference(plain, model, inputs)) > 0
    with torch.no_grad():
        assert all(out["instances"].pred_masks.any() for out in plain.eval()(inputs))  # MBRM refined real masks


def test_blendmask_with_mbrm_off_and_without_detections():
    plain = visible_blendmask_masks(build_tiny_model(tiny_cfg(config_path(BLENDMASK), BLENDMASK_OPTS))).eval()
    off = build_tiny_model(tiny_cfg(config_path(BLENDMASK_WITH_MBRM), BLENDMASK_OPTS + ["MODEL.MBRM.ENABLED", "False"]))
    assert off.mbrm is None and off.state_dict().keys() == plain.state_dict().keys()
    off.load_state_dict(plain.state_dict())
    inputs = dataset_batch(tiny_cfg(config_path(BLENDMASK), BLENDMASK_OPTS), indices=(0,), is_train=False)
    with torch.no_grad():
        a, b = plain(inputs)[0]["instances"], off.eval()(inputs)[0]["instances"]
    for field in ("pred_boxes", "scores", "pred_classes", "pred_masks"):
        value_a, value_b = a.get(field), b.get(field)
        assert torch.equal(getattr(value_a, "tensor", value_a), getattr(value_b, "tensor", value_b)), field
    assert a.pred_masks.any()
    # N = 0 with MBRM on
    cfg = tiny_cfg(config_path(BLENDMASK_WITH_MBRM), BLENDMASK_OPTS + ["MODEL.FCOS.INFERENCE_TH_TEST", "1.0"])
    (inp,), (instances,) = predict(build_tiny_model(cfg), cfg)
    assert_prediction_fields(instances, inp["height"], inp["width"])
    assert len(instances) == 0
