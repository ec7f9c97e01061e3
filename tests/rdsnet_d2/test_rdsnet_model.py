"""RDSNet end to end on CPU: train step, inference format, empty images, checkpoints, overfitting,
the MBRM training stage and official checkpoint names."""
import copy
import csv
import os
import re

import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.structures import Boxes, Instances
from detectron2.structures.masks import polygons_to_bitmask

from d2ext.testing import (
    REFERENCE_DIR, assert_masks_inside_expanded_boxes, bilinear_resize_reference, build_tiny_model,
    checkpoint_round_trip, config_path, dataset_batch, overfit, tiny_cfg, train_step,
)
from rdsnet_d2.checkpoint import official_to_detectron2_name, reorder_anchors

CONFIG = "quickstart/rdsnet_R18_FPN_synthetic.yaml"
SMALL = ["INPUT.MIN_SIZE_TEST", "96", "INPUT.MAX_SIZE_TEST", "128", "MODEL.RDSNET.PIXEL_CONV_DIM", "32",
         "MODEL.RETINANET.NUM_CONVS", "2"]  # 64 FPN channels: GN(32) needs 2 channels per group on 1x1 P7
# Every anchor passes the score threshold, so untrained models still produce detections and masks.
ALL_DETECTIONS = ["MODEL.RETINANET.SCORE_THRESH_TEST", "0.0", "TEST.DETECTIONS_PER_IMAGE", "20",
                  "MODEL.RDSNET.MASK_CHUNK_SIZE", "7"]
TSV = os.path.join(REFERENCE_DIR, "rdsnet_keys.tsv")


@pytest.fixture(scope="module")
def cfg():
    return tiny_cfg(config_path(CONFIG), SMALL)


def _empty_image_batch(cfg):
    batch = dataset_batch(cfg, indices=(0, 1))
    image = batch[1]["instances"]
    batch[1]["instances"] = Instances(image.image_size, gt_boxes=Boxes(torch.zeros(0, 4)),
                                      gt_classes=torch.zeros(0, dtype=torch.long),
                                      gt_masks=image.gt_masks[[]] if len(image) else image.gt_masks)
    return batch


def test_train_step_and_inference_format(cfg):
    model = build_tiny_model(cfg)
    batch = dataset_batch(cfg)
    losses = train_step(model, batch)
    assert set(losses) == {"loss_cls", "loss_box_reg", "loss_mask"}
    assert all(torch.isfinite(torch.tensor(v)) for v in losses.values()) and losses["loss_mask"] > 0
    # every parameter received a gradient (DDP needs no unused parameters)
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)

    model = build_tiny_model(tiny_cfg(config_path(CONFIG), SMALL + ALL_DETECTIONS))
    model.eval()
    inputs = dataset_batch(cfg, is_train=False)
    with torch.no_grad():
        outputs = model(inputs)
    for inp, out in zip(inputs, outputs):
        inst = out["instances"]
        assert inst.image_size == (inp["height"], inp["width"])  # original size, not the resized input
        # 20 detections, less those whose box is empty once clipped (dropped, as in Detectron2)
        n = len(inst)
        assert 15 <= n <= 20
        assert inst.pred_masks.shape == (n, inp["height"], inp["width"]) and inst.pred_masks.dtype == torch.bool
        assert inst.pred_boxes.tensor.shape == (n, 4) and inst.scores.shape == (n,)
        assert inst.pred_classes.max() < 4
        assert_masks_inside_expanded_boxes(inst, 0.1)  # the test crop (MODEL.RDSNET.TEST_CROP_EXPAND)


def test_box_coordinate_terms_train_and_predict(cfg):
    """MODEL.RDSNET.BOX_COORD_TERMS on the RetinaNet object stream: 4 more values per slot and anchor."""
    opts = SMALL + ["MODEL.RDSNET.BOX_COORD_TERMS", "True"]
    model = build_tiny_model(tiny_cfg(config_path(CONFIG), opts))
    assert model.head.rep_pred.out_channels == model.head.num_anchors * 2 * (cfg.MODEL.RDSNET.REP_DIM + 4)
    losses = train_step(model, dataset_batch(cfg))
    assert losses["loss_mask"] > 0 and model.head.rep_pred.weight.grad.abs().sum() > 0
    model = build_tiny_model(tiny_cfg(config_path(CONFIG), opts + ALL_DETECTIONS)).eval()
    inputs = dataset_batch(cfg, indices=(0,), is_train=False)
    with torch.no_grad():
        inst = model(inputs)[0]["instances"]
    assert 15 <= len(inst) <= 20 and inst.pred_masks.shape[1:] == (inputs[0]["height"], inputs[0]["width"])


def test_gt_masks_at_mask_stride_match_a_per_mask_loop(cfg):
    """The training targets' GT masks, resized a few at a time: each as its own bilinear resize > 0.5."""
    model = build_tiny_model(cfg)
    gt = dataset_batch(cfg, indices=(6,))[0]["instances"]  # 6 instances in 91 x 128
    padded_size, mask_size = (96, 128), (24, 32)
    small, areas = model._gt_masks_at_mask_stride(gt, padded_size, mask_size, chunk_size=2)
    assert len(gt) > 2 and small.shape == (len(gt), *mask_size) and small.dtype == torch.bool
    for g, polygons in enumerate(gt.gt_masks.polygons):
        full = torch.zeros(padded_size)
        full[: gt.image_size[0], : gt.image_size[1]] = torch.from_numpy(
            polygons_to_bitmask(polygons, *gt.image_size)).float()
        assert torch.equal(small[g], bilinear_resize_reference(full, mask_size) > 0.5), g
        assert areas[g] == full.sum()


def test_chunked_masks_equal_one_chunk(cfg):
    opts = SMALL + ALL_DETECTIONS
    chunked = build_tiny_model(tiny_cfg(config_path(CONFIG), opts)).eval()
    whole = build_tiny_model(tiny_cfg(config_path(CONFIG), opts + ["MODEL.RDSNET.MASK_CHUNK_SIZE", "100"])).eval()
    inputs = dataset_batch(cfg, indices=(2,), is_train=False)
    with torch.no_grad():
        a, b = chunked(inputs)[0]["instances"], whole(inputs)[0]["instances"]
    assert torch.equal(a.pred_masks, b.pred_masks) and torch.equal(a.pred_boxes.tensor, b.pred_boxes.tensor)


def test_zero_detections(cfg):
    model = build_tiny_model(tiny_cfg(config_path(CONFIG), SMALL + ["MODEL.RETINANET.SCORE_THRESH_TEST", "1.0",
                                                                     "MODEL.MBRM.ENABLED", "True"])).eval()
    inputs = dataset_batch(cfg, is_train=False)
    with torch.no_grad():
        inst = model(inputs)[0]["instances"]
    assert len(inst) == 0 and inst.pred_masks.shape == (0, inputs[0]["height"], inputs[0]["width"])


def test_image_without_annotations_trains(cfg):
    model = build_tiny_model(cfg)
    losses = train_step(model, _empty_image_batch(cfg))
    assert all(torch.isfinite(torch.tensor(v)) for v in losses.values())
    only_empty = _empty_image_batch(cfg)[1:]
    losses = train_step(model, only_empty)
    assert losses["loss_mask"] == 0.0 and losses["loss_box_reg"] == 0.0 and losses["loss_cls"] > 0
    assert all(p.grad is not None for p in model.parameters())


def test_missing_masks_is_a_clear_error(cfg):
    with pytest.raises(ValueError, match="MASK_ON"):
        build_tiny_model(tiny_cfg(config_path(CONFIG), SMALL + ["MODEL.MASK_ON", "False"]))


def test_checkpoint_round_trip(cfg, tmp_path):
    opts = SMALL + ALL_DETECTIONS + ["MODEL.MBRM.ENABLED", "True"]
    cfg = tiny_cfg(config_path(CONFIG), opts)
    model = build_tiny_model(cfg).eval()
    loaded = checkpoint_round_trip(model, cfg, str(tmp_path)).eval()
    for key, value in model.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key
    inputs = dataset_batch(cfg, indices=(3,), is_train=False)
    with torch.no_grad():
        a, b = model(inputs)[0]["instances"], loaded(inputs)[0]["instances"]
    assert torch.equal(a.pred_masks, b.pred_masks) and torch.equal(a.pred_boxes.tensor, b.pred_boxes.tensor)


def test_overfit_loss_falls(cfg):
    torch.manual_seed(0)
    model = build_tiny_model(cfg)
    history = overfit(model, dataset_batch(cfg, indices=(0,)), iterations=20, lr=0.02)
    assert min(history[-3:]) < 0.7 * history[0], history  # measured: 1.03 -> 0.60


def test_mbrm_training_stage(cfg, tmp_path):
    """Only MBRM learns (from a zero kernel, s = 3); everything else stays bit-identical."""
    opts = SMALL + ["MODEL.MBRM.TRAIN", "True", "MODEL.MBRM.KERNEL_HALF_SIZE", "3",
                    "MODEL.RETINANET.SCORE_THRESH_TEST", "0.0", "MODEL.MBRM.TRAIN_IOU", "0.3"]
    model = build_tiny_model(tiny_cfg(config_path(CONFIG), opts))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable == ["mbrm.weight", "mbrm.bias"]
    frozen = copy.deepcopy({k: v for k, v in model.state_dict().items() if not k.startswith("mbrm.")})
    batch = dataset_batch(cfg, indices=(0, 1))
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.05)
    history = [train_step(model, batch, optimizer)["loss_mbrm"] for _ in range(8)]
    assert history[-1] < 0.97 * history[0], history  # measured 3.20 -> 3.05, falling at every step
    for key, value in model.state_dict().items():
        if not key.startswith("mbrm."):
            assert torch.equal(value, frozen[key]), key


def _official_names():
    with open(TSV) as f:
        rows = [r for r in csv.reader(f, delimiter="\t") if r and not r[0].startswith("#") and r[0] != "key"]
    return [r[0] for r in rows]


def _fake_official_state_dict(model):
    """Official names for every head / pixel-stream / FPN / backbone parameter of ``model``: head and
    pixel-stream names from the .tsv, FPN and ResNet names from the .tsv's naming rules."""
    names = _official_names()
    target = model.state_dict()
    official = {}
    for name in names:
        if name.startswith("mbrm."):
            continue
        new = official_to_detectron2_name(name)
        assert new is not None, name
        if new in target:  # the tiny model has 2 tower convs (the .tsv lists 4)
            official[name] = torch.randn_like(target[new].float())
    for i in range(3):
        official[f"neck.lateral_convs.{i}.conv.weight"] = torch.randn_like(target[f"backbone.fpn_lateral{i + 3}.weight"])
        official[f"neck.fpn_convs.{i}.conv.weight"] = torch.randn_like(target[f"backbone.fpn_output{i + 3}.weight"])
    official["neck.fpn_convs.3.conv.weight"] = torch.randn_like(target["backbone.top_block.p6.weight"])
    official["neck.fpn_convs.4.conv.bias"] = torch.randn_like(target["backbone.top_block.p7.bias"])
    official["backbone.conv1.weight"] = torch.randn_like(target["backbone.bottom_up.stem.conv1.weight"])
    official["backbone.bn1.running_var"] = torch.rand_like(target["backbone.bottom_up.stem.conv1.norm.running_var"])
    official["backbone.layer2.0.downsample.0.weight"] = torch.randn_like(target["backbone.bottom_up.res3.0.shortcut.weight"])
    official["backbone.layer3.1.bn2.bias"] = torch.randn_like(target["backbone.bottom_up.res4.1.conv2.norm.bias"])
    official["backbone.layer3.1.bn2.num_batches_tracked"] = torch.tensor(7)
    return official


def test_official_checkpoint_names(cfg, tmp_path):
    assert os.path.exists(TSV), TSV
    names = _official_names()
    assert len(names) == 61  # 59 head and pixel-stream keys + mbrm.weight, mbrm.bias
    unknown = [n for n in names if official_to_detectron2_name(n) is None]
    assert not unknown
    # Official FPN convs have biases; the official weights take RGB (the quick-start config BGR).
    opts = SMALL + ["MODEL.FPN.NORM", "", "MODEL.RESNETS.NORM", "FrozenBN", "INPUT.FORMAT", "RGB"]
    cfg = tiny_cfg(config_path(CONFIG), opts)
    model = build_tiny_model(cfg)
    official = _fake_official_state_dict(model)
    path = str(tmp_path / "official.pth")
    torch.save(official, path)  # the official file's ckpt["state_dict"]
    DetectionCheckpointer(model).load(path)
    state = model.state_dict()
    for name, value in official.items():
        if name.endswith("num_batches_tracked"):
            continue
        new = official_to_detectron2_name(name)
        if new.startswith(("head.cls_score", "head.bbox_pred", "head.rep_pred")):
            value = reorder_anchors(value, 3, 3)
        assert torch.equal(state[new], value), name
    # anchor order: Detectron2 anchor (size s, ratio r) = official anchor (ratio r, size s)
    cls_official, cls = official["bbox_head.retina_cls.bias"].view(3, 3, 4), state["head.cls_score.bias"].view(3, 3, 4)
    for s in range(3):
        for r in range(3):
            assert torch.equal(cls[s, r], cls_official[r, s])
    # MBRM's constants in a refine checkpoint are not needed by a model without MBRM
    torch.save({**official, "mbrm.weight": torch.zeros(1, 1, 9), "mbrm.bias": torch.zeros(1)}, path)
    DetectionCheckpointer(build_tiny_model(cfg)).load(path)
    # an unknown official key, or a shape mismatch, is an error that names it
    for bad_key, bad_value in (("bbox_head.retina_iou.weight", torch.zeros(1)),
                               ("bbox_head.retina_rep.bias", torch.zeros(9 * 2 * 32 + 9))):
        torch.save({**official, bad_key: bad_value}, path)
        with pytest.raises(RuntimeError, match=bad_key.replace(".", r"\.")):
            DetectionCheckpointer(build_tiny_model(cfg)).load(path)


def test_official_checkpoint_into_a_model_with_msra_input_conventions_is_an_error(tmp_path):
    opts = SMALL + ["MODEL.FPN.NORM", "", "MODEL.RESNETS.NORM", "FrozenBN", "MODEL.RESNETS.DEPTH", 50,
                    "MODEL.RESNETS.RES2_OUT_CHANNELS", 256, "MODEL.PIXEL_STD", [1.0, 1.0, 1.0]]
    model = build_tiny_model(tiny_cfg(config_path(CONFIG), opts + ["MODEL.RESNETS.STRIDE_IN_1X1", True]))
    path = str(tmp_path / "official.pth")
    torch.save(_fake_official_state_dict(model), path)
    message = ("official RDSNet checkpoint: the model takes its input otherwise than these weights were trained: "
               "INPUT.FORMAT 'BGR' (torchvision: 'RGB'); MODEL.PIXEL_STD [1.0, 1.0, 1.0] (torchvision: ImageNet, "
               "[58.395, 57.12, 57.375]); MODEL.RESNETS.STRIDE_IN_1X1 True (torchvision: False). Use "
               "configs/RDSNet/Base-RDSNet.yaml's input settings.")
    with pytest.raises(RuntimeError, match=re.escape(message)):
        DetectionCheckpointer(model).load(path)
    # With the official conventions the same file loads.
    official_cfg = tiny_cfg(config_path(CONFIG), opts + ["MODEL.RESNETS.STRIDE_IN_1X1", False, "INPUT.FORMAT", "RGB",
                                                         "MODEL.PIXEL_STD", [58.395, 57.12, 57.375]])
    DetectionCheckpointer(build_tiny_model(official_cfg)).load(path)


@pytest.mark.parametrize("top_levels, levels", [(2, ["p3", "p4", "p5", "p6", "p7"]), (1, ["p3", "p4", "p5", "p6"]),
                                                (0, ["p3", "p4", "p5"])])
def test_backbone_top_levels(top_levels, levels):
    from detectron2.modeling import build_backbone

    official = build_backbone(tiny_cfg(config_path(CONFIG), SMALL))
    backbone = build_backbone(tiny_cfg(config_path(CONFIG), SMALL + ["MODEL.RDSNET.TOP_LEVELS", str(top_levels)]))
    assert list(backbone.output_shape()) == levels
    assert [s.stride for s in backbone.output_shape().values()] == [8, 16, 32, 64, 128][:len(levels)]
    # The levels it keeps are the official block's: its weights load and give the same maps.
    backbone.load_state_dict(official.state_dict(), strict=False)
    official.eval(), backbone.eval()
    image = torch.randn(1, 3, 128, 96)
    with torch.no_grad():
        expected, out = official(image), backbone(image)
    for level in levels:
        torch.testing.assert_close(out[level], expected[level])


def test_backbone_top_levels_bad_value():
    with pytest.raises(ValueError, match="MODEL.RDSNET.TOP_LEVELS must be 0, 1 or 2, got 3"):
        build_tiny_model(tiny_cfg(config_path(CONFIG), SMALL + ["MODEL.RDSNET.TOP_LEVELS", "3"]))


def test_backbone_level_no_head_reads_is_a_clear_error():
    # P2-P6 object stream with the official P6 + P7: P7 would get no gradient (DDP fails mid-training).
    opts = ["MODEL.RESNETS.OUT_FEATURES", '["res2", "res3", "res4", "res5"]',
            "MODEL.FPN.IN_FEATURES", '["res2", "res3", "res4", "res5"]',
            "MODEL.RETINANET.IN_FEATURES", '["p2", "p3", "p4", "p5", "p6"]']
    with pytest.raises(ValueError, match=r"computes \['p7'\], which no head reads .*MODEL.RDSNET.TOP_LEVELS"):
        build_tiny_model(tiny_cfg(config_path(CONFIG), SMALL + opts))


def test_p2_p6_object_stream_trains_every_parameter():
    cfg = tiny_cfg(config_path("quickstart/rdsnet_R18_FPN_synthetic_stride2_p2p6.yaml"), SMALL)
    model = build_tiny_model(cfg)
    assert model.head_in_features == ["p2", "p3", "p4", "p5", "p6"]
    assert model.mask_stride == 2
    losses = train_step(model, dataset_batch(cfg))
    assert losses["loss_mask"] > 0 and all(torch.isfinite(torch.tensor(v)) for v in losses.values())
    unused = [name for name, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not unused
