"""MBRM as a post-processor of other models: the generic refinement against a per-detection loop, and
Mask R-CNN with MBRM (``GeneralizedRCNNWithMBRM``) end to end against plain ``GeneralizedRCNN``."""
import os

import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.layers import paste_masks_in_image
from detectron2.modeling.postprocessing import detector_postprocess
from detectron2.structures import Boxes, Instances

from d2ext.testing import build_tiny_model, config_path, dataset_batch, tiny_cfg, train_step
from rdsnet_d2 import MBRM, GeneralizedRCNNWithMBRM, refine_instances_with_mbrm
from rdsnet_d2.mbrm import OFFICIAL_KERNEL
from rdsnet_d2.mbrm_postprocess import pasted_soft_masks

PLAIN = "quickstart/mask_rcnn_R18_FPN_synthetic.yaml"
WITH_MBRM = "quickstart/mask_rcnn_R18_FPN_mbrm_synthetic.yaml"
# Small images; every RoI passes the score threshold, so untrained models still detect.
OPTS = ["INPUT.MIN_SIZE_TEST", "96", "INPUT.MAX_SIZE_TEST", "128", "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0",
        "TEST.DETECTIONS_PER_IMAGE", "20", "MODEL.MBRM.MASK_CHUNK_SIZE", "7"]


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


def test_pasted_soft_masks_chunked_equals_one_paste():
    torch.manual_seed(0)
    roi_masks = torch.rand(5, 28, 28)
    boxes = torch.tensor([[2.0, 3.0, 20.0, 15.0], [0.0, 0.0, 40.0, 30.0], [10.5, 4.2, 11.5, 5.0],
                          [30.0, 20.0, 45.0, 32.0], [5.0, 5.0, 25.0, 9.0]])
    chunks = list(pasted_soft_masks(roi_masks, boxes, (32, 40), chunk_size=2))
    assert [len(c) for c in chunks] == [2, 2, 1]
    soft = torch.cat(chunks)
    assert torch.equal(soft, paste_masks_in_image(roi_masks, boxes, (32, 40), threshold=-1).float() / 255)
    assert soft.min() >= 0 and soft.max() <= 1 and soft[0].max() > 0.5
    assert soft[0, 17:].sum() == 0 and soft[0, :, 22:].sum() == 0  # nothing beyond the box's fringe


def _reference_outputs(plain, inputs, mbrm):
    """Plain Mask R-CNN outputs whose boxes are refined one detection at a time from masks pasted one
    detection at a time (soft: 0..255 / 255, as Detectron2 pastes at threshold -1)."""
    with torch.no_grad():
        raw = plain.inference(inputs, do_postprocess=False)
    outputs = []
    for result, inp in zip(raw, inputs):
        result.roi_masks = result.pred_masks[:, 0]
        result = detector_postprocess(result, inp["height"], inp["width"])
        boxes = []
        for i in range(len(result)):
            box = result.pred_boxes.tensor[i: i + 1]
            soft = paste_masks_in_image(result.roi_masks[i: i + 1], box, result.image_size, threshold=-1)
            boxes.append(mbrm(soft.float() / 255, box))
        outputs.append(torch.cat(boxes))
    return outputs


def test_mask_rcnn_with_mbrm_end_to_end():
    plain = build_tiny_model(tiny_cfg(config_path(PLAIN), OPTS)).eval()
    model = build_tiny_model(tiny_cfg(config_path(WITH_MBRM), OPTS)).eval()
    assert isinstance(model, GeneralizedRCNNWithMBRM) and isinstance(model.mbrm, MBRM)
    incompatible = model.load_state_dict(plain.state_dict(), strict=False)
    assert incompatible.missing_keys == ["mbrm.weight", "mbrm.bias"] and not incompatible.unexpected_keys
    inputs = dataset_batch(tiny_cfg(config_path(PLAIN), OPTS), is_train=False)
    with torch.no_grad():
        expected, refined = plain(inputs), model(inputs)
    reference_boxes = _reference_outputs(plain, inputs, model.mbrm)
    moved = 0
    for inp, exp, out, boxes in zip(inputs, expected, refined, reference_boxes):
        exp, out = exp["instances"], out["instances"]
        assert out.image_size == (inp["height"], inp["width"]) and len(out) == 20
        assert set(out.get_fields()) == set(exp.get_fields())
        for field in ("scores", "pred_classes", "pred_masks"):
            assert torch.equal(out.get(field), exp.get(field)), field
        assert torch.equal(out.pred_boxes.tensor, boxes)
        moved += int((out.pred_boxes.tensor != exp.pred_boxes.tensor).sum())
    assert moved > 0


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


def test_mask_rcnn_with_mbrm_config_errors():
    with pytest.raises(ValueError, match="RDSNet only"):
        build_tiny_model(tiny_cfg(config_path(WITH_MBRM), OPTS + ["MODEL.MBRM.TRAIN", "True"]))
    with pytest.raises(ValueError, match="MASK_ON"):
        build_tiny_model(tiny_cfg(config_path(WITH_MBRM), OPTS + ["MODEL.MASK_ON", "False"]))
