"""End-to-end NL-RoI models on CPU: train step + inference (box, box+mask, keypoint, cascade), empty
images, checkpoints (round trip; a plain model's checkpoint reproduces the plain model exactly) and a
short overfit run on built-in images."""
import copy
import os
import re

import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.layers import ShapeSpec
from detectron2.modeling.roi_heads import KRCNNConvDeconvUpsampleHead
from detectron2.structures import Keypoints
from torchvision.ops import box_iou

from nlroi_d2 import NLRoIKRCNNConvDeconvUpsampleHead
from d2ext.testing import (build_tiny_model, checkpoint_round_trip, config_path, dataset_batch, tiny_cfg, train_step)

NLROI = config_path("quickstart/nlroi_mask_rcnn_R18_FPN_synthetic.yaml")
PLAIN = config_path("quickstart/nlroi_plain_mask_rcnn_R18_FPN_synthetic.yaml")
SMALL = ["INPUT.MIN_SIZE_TEST", 96, "INPUT.MAX_SIZE_TEST", 160, "MODEL.RPN.POST_NMS_TOPK_TEST", 60,
         "MODEL.RPN.POST_NMS_TOPK_TRAIN", 60, "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", 32,
         "TEST.DETECTIONS_PER_IMAGE", 20]


def small_cfg(path=NLROI, opts=()):
    return tiny_cfg(path, SMALL + list(opts))


def with_empty_image(batch):
    """The batch with its first image's annotations removed."""
    batch = copy.deepcopy(batch)
    batch[0]["instances"] = batch[0]["instances"][:0]
    return batch


def check_train_and_inference(cfg, batch=None, test_batch=None):
    model = build_tiny_model(cfg)
    batch = batch or with_empty_image(dataset_batch(cfg))
    losses = train_step(model, batch)
    assert losses and all(torch.isfinite(torch.tensor(v)) for v in losses.values()), losses
    for name, p in model.named_parameters():
        if "nl_roi" in name or "nonlocal_weight" in name:
            assert p.grad is not None, name  # every block parameter takes part (DDP)
    model.eval()
    with torch.no_grad():
        outputs = model(test_batch or dataset_batch(cfg, is_train=False))
    for out in outputs:
        instances = out["instances"]
        assert len(instances) <= cfg.TEST.DETECTIONS_PER_IMAGE
        assert torch.isfinite(instances.pred_boxes.tensor).all()
    return model, losses, outputs


def test_box_mask_model_train_step_and_inference():
    _, losses, outputs = check_train_and_inference(small_cfg())
    assert {"loss_cls", "loss_box_reg", "loss_mask"} <= set(losses)
    assert outputs[0]["instances"].has("pred_masks") and len(outputs[0]["instances"]) > 0


def test_box_only_model_with_hard_nms():
    cfg = small_cfg(opts=["MODEL.MASK_ON", False, "MODEL.ROI_HEADS.SOFT_NMS.ENABLED", False,
                          "MODEL.ROI_HEADS.BOX_VOTE.ENABLED", False])
    _, losses, outputs = check_train_and_inference(cfg)
    assert "loss_mask" not in losses and not outputs[0]["instances"].has("pred_masks")


def test_box_head_with_fc_only():
    """NUM_CONV 0: the block feeds fc1, which gains the nonlocal columns."""
    cfg = small_cfg(opts=["MODEL.ROI_BOX_HEAD.NUM_CONV", 0, "MODEL.ROI_BOX_HEAD.NUM_FC", 2])
    model, _, _ = check_train_and_inference(cfg)
    fc1 = model.roi_heads.box_head.fc1
    assert fc1.nonlocal_weight.shape == (cfg.MODEL.ROI_BOX_HEAD.FC_DIM, cfg.MODEL.NL_ROI.G_CHANNELS * 7 * 7)


def test_keypoint_model():
    cfg = small_cfg(opts=["MODEL.MASK_ON", False, "MODEL.KEYPOINT_ON", True,
                          "MODEL.ROI_KEYPOINT_HEAD.NAME", "NLRoIKRCNNConvDeconvUpsampleHead",
                          "MODEL.ROI_KEYPOINT_HEAD.NUM_KEYPOINTS", 3, "MODEL.ROI_KEYPOINT_HEAD.CONV_DIMS", [32, 32],
                          "MODEL.ROI_KEYPOINT_HEAD.MIN_KEYPOINTS_PER_IMAGE", 0])
    data_cfg = small_cfg(opts=["MODEL.MASK_ON", False])  # the synthetic data has no keypoint metadata
    batch = dataset_batch(data_cfg)
    for record in batch:  # three visible keypoints per object: its box corners and centre
        boxes = record["instances"].gt_boxes.tensor
        points = torch.stack([boxes[:, :2], (boxes[:, :2] + boxes[:, 2:]) / 2, boxes[:, 2:] - 1], dim=1)
        record["instances"].gt_keypoints = Keypoints(torch.cat([points, torch.full_like(points[..., :1], 2)], 2))
    _, losses, outputs = check_train_and_inference(cfg, with_empty_image(batch),
                                                   dataset_batch(data_cfg, is_train=False))
    assert "loss_keypoint" in losses and outputs[0]["instances"].has("pred_keypoints")


def test_keypoint_head_with_plain_weights_is_the_stock_head():
    """Heatmaps of the stock head's size and values: the NL-RoI head with the stock head's weights (its new
    parameters zero-initialised) is the stock head, including the final 2x upsampling."""
    shape = ShapeSpec(channels=16, height=14, width=14)
    head_args = dict(num_keypoints=3, conv_dims=[32, 32], loss_weight=1.0, loss_normalizer=1.0)
    torch.manual_seed(0)
    stock = KRCNNConvDeconvUpsampleHead(shape, **head_args).eval()
    nl_head = NLRoIKRCNNConvDeconvUpsampleHead(shape, nl_embed_channels=8, nl_g_channels=4, **head_args).eval()
    missing = nl_head.load_state_dict(stock.state_dict(), strict=False).missing_keys
    assert missing and all(k.startswith("nl_roi.") or k.endswith("nonlocal_weight") for k in missing)
    x = torch.randn(5, 16, 14, 14)
    with torch.no_grad():
        expected = stock.layers(x)
        assert expected.shape == (5, 3, 56, 56)
        assert torch.equal(nl_head.layers((x, [2, 3])), expected)


def test_cascade_model_with_soft_nms():
    cfg = small_cfg(opts=["MODEL.ROI_HEADS.NAME", "NLRoICascadeROIHeads", "MODEL.ROI_BOX_HEAD.CLS_AGNOSTIC_BBOX_REG",
                          True, "MODEL.ROI_BOX_HEAD.NUM_CONV", 1])
    model, losses, _ = check_train_and_inference(cfg)
    assert "loss_cls_stage2" in losses
    assert all(hasattr(head, "nl_roi") for head in model.roi_heads.box_head)


def test_zero_proposals_at_inference():
    """No proposal survives: the heads run on N = 0 and return empty Instances."""
    cfg = small_cfg(opts=["MODEL.RPN.POST_NMS_TOPK_TEST", 0])
    model = build_tiny_model(cfg).eval()
    with torch.no_grad():
        outputs = model(dataset_batch(cfg, is_train=False))
    assert all(len(o["instances"]) == 0 for o in outputs)


@pytest.mark.parametrize("key, value", [
    ("MODEL.ROI_HEADS.SOFT_NMS.METHOD", "cubic"), ("MODEL.ROI_HEADS.SOFT_NMS.SIGMA", 0.0),
    ("MODEL.ROI_HEADS.SOFT_NMS.SCORE_FLOOR", -1.0), ("MODEL.ROI_HEADS.NMS_THRESH_TEST", 1.5),
    ("MODEL.ROI_HEADS.BOX_VOTE.SCORING_METHOD", "MEDIAN"), ("MODEL.ROI_HEADS.BOX_VOTE.IOU_THRESHOLD", 0.0),
    ("MODEL.ROI_HEADS.BOX_VOTE.BETA", 0.0),
])
def test_bad_postprocess_config_is_named(key, value):
    """The quick-start NL-RoI config has Soft-NMS and box voting on: a bad value names its key."""
    with pytest.raises(ValueError, match=re.escape(key)):
        build_tiny_model(small_cfg(opts=[key, value]))


def test_nl_box_head_under_stock_roi_heads_is_an_error():
    cfg = small_cfg(opts=["MODEL.ROI_HEADS.NAME", "StandardROIHeads"])
    with pytest.raises(ValueError, match="NLRoIROIHeads"):
        train_step(build_tiny_model(cfg), dataset_batch(cfg))


def test_checkpoint_round_trip(tmp_path):
    cfg = small_cfg()
    model = build_tiny_model(cfg).eval()
    other = checkpoint_round_trip(model, cfg, str(tmp_path)).eval()
    for key, value in model.state_dict().items():
        assert torch.equal(value, other.state_dict()[key]), key
    batch = dataset_batch(cfg, is_train=False)
    with torch.no_grad():
        a, b = model(batch)[0]["instances"], other(batch)[0]["instances"]
    assert torch.equal(a.pred_boxes.tensor, b.pred_boxes.tensor) and torch.equal(a.pred_masks, b.pred_masks)


def test_plain_checkpoint_reproduces_plain_model_exactly(tmp_path):
    """A plain (model-zoo style) checkpoint loads into the NL-RoI model with only the new parameters
    missing, and the NL-RoI model's outputs equal the plain model's bit for bit."""
    plain_cfg, nl_cfg = small_cfg(PLAIN), small_cfg(NLROI)
    plain = build_tiny_model(plain_cfg, seed=3).eval()
    DetectionCheckpointer(plain, save_dir=str(tmp_path)).save("plain")
    nl_model = build_tiny_model(nl_cfg, seed=4).eval()

    plain_state, nl_state = plain.state_dict(), nl_model.state_dict()
    assert set(plain_state) <= set(nl_state)
    assert all(plain_state[k].shape == nl_state[k].shape for k in plain_state)  # nothing skipped on load
    new_keys = set(nl_state) - set(plain_state)
    assert new_keys and all(".nl_roi." in k or k.endswith(".nonlocal_weight") for k in new_keys)

    DetectionCheckpointer(nl_model).load(os.path.join(str(tmp_path), "plain.pth"))
    batch = dataset_batch(nl_cfg, is_train=False)
    with torch.no_grad():
        expected, actual = plain(batch), nl_model(batch)
    for e, a in zip(expected, actual):
        e, a = e["instances"], a["instances"]
        assert len(e) > 0
        assert torch.equal(e.pred_boxes.tensor, a.pred_boxes.tensor)
        assert torch.equal(e.scores, a.scores) and torch.equal(e.pred_classes, a.pred_classes)
        assert torch.equal(e.pred_masks, a.pred_masks)



def test_overfit_one_image():
    """40 Adam steps on one 96x128 built-in image: the loss falls and every trained-on object is found.

    Adam, not SGD: from scratch, SGD's loss curve on one image depended on the seed and thread count.
    The total loss falls less than its parts because more proposals become foreground as the RPN
    learns, which raises the box-regression term."""
    cfg = small_cfg()
    model = build_tiny_model(cfg, seed=0)
    batch = dataset_batch(cfg, indices=(0,))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    history = [sum(train_step(model, batch, optimizer).values()) for _ in range(40)]
    first, last = sum(history[:3]) / 3, sum(history[-5:]) / 5
    assert last < 0.65 * first, history

    model.eval()
    with torch.no_grad():
        out = model(dataset_batch(cfg, indices=(0,), is_train=False))[0]["instances"]
    gt = batch[0]["instances"].gt_boxes.tensor
    scale = out.image_size[0] / batch[0]["image"].shape[1]  # outputs are at the record's size
    pred = out.pred_boxes.tensor[:10] / scale
    assert len(gt) and len(pred), (history, out)
    assert (box_iou(gt, pred).max(dim=1).values > 0.5).all(), (history, pred, gt)
