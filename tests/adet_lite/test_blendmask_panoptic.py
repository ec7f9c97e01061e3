"""BlendMask's panoptic output (MODEL.PANOPTIC_FPN.COMBINE.ENABLED, AdelaiDet's panoptic BlendMask): Detectron2's
semantic head trained on "sem_seg", combined with the instances by Detectron2's
combine_semantic_and_instance_outputs. Tiny models on the built-in dataset (CPU), with "sem_seg" targets in
Detectron2's panoptic-separated convention derived here: 0 = any thing, 1 / 2 = the top / bottom of the
background (two stuff classes), 255 = unlabelled (a strip along the left border)."""
import math
import re
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.data import MetadataCatalog
from detectron2.modeling.meta_arch.panoptic_fpn import combine_semantic_and_instance_outputs
from detectron2.structures import BitMasks

from adet_lite.blendmask.panoptic import sem_seg_targets
from d2ext.export import check_exportable
from d2ext.testing import (
    build_tiny_model, checkpoint_round_trip, config_path, dataset_batch, fake_bottom_up_state, random_weight,
    read_reference_keys, tiny_cfg, train_step)

BLENDMASK_YAML = config_path("quickstart/blendmask_R18_synthetic.yaml")
# Test-sized on top of the quick-start config (as tests/adet_lite/test_blendmask.py), with P2 in the FPN
# for the semantic head, as configs/BlendMask/Panoptic/Base-Panoptic.yaml.
SMALL = ["INPUT.MIN_SIZE_TEST", 96, "INPUT.MAX_SIZE_TEST", 144, "MODEL.FCOS.NUM_CLS_CONVS", 1,
         "MODEL.FCOS.NUM_BOX_CONVS", 1, "MODEL.BASIS_MODULE.NUM_CONVS", 1, "MODEL.BASIS_MODULE.CONVS_DIM", 32,
         "MODEL.RESNETS.OUT_FEATURES", ["res2", "res3", "res4", "res5"],
         "MODEL.FPN.IN_FEATURES", ["res2", "res3", "res4", "res5"]]
NUM_CLASSES = 3  # things + 2 stuff classes
IGNORE = 255
# Thresholds other than Detectron2's defaults (0.5, 4096, 0.5), so that the test sees them used.
OVERLAP, STUFF_AREA, SCORE = 0.4, 300, 0.0
PANOPTIC = SMALL + ["MODEL.PANOPTIC_FPN.COMBINE.ENABLED", True, "MODEL.SEM_SEG_HEAD.NUM_CLASSES", NUM_CLASSES,
                    "MODEL.SEM_SEG_HEAD.CONVS_DIM", 32, "MODEL.SEM_SEG_HEAD.LOSS_WEIGHT", 0.5,
                    "MODEL.PANOPTIC_FPN.COMBINE.OVERLAP_THRESH", OVERLAP,
                    "MODEL.PANOPTIC_FPN.COMBINE.STUFF_AREA_LIMIT", STUFF_AREA,
                    "MODEL.PANOPTIC_FPN.COMBINE.INSTANCES_CONFIDENCE_THRESH", SCORE]
INSTANCE_LOSSES = {"loss_fcos_cls", "loss_fcos_loc", "loss_fcos_ctr", "loss_mask", "loss_basis_sem"}


def _with_sem_seg(batch):
    """Add "sem_seg" (H, W) int64 at each input's image size, derived from its instances."""
    for x in batch:
        height, width = x["image"].shape[-2:]
        things = BitMasks.from_polygon_masks(x["instances"].gt_masks, height, width).tensor.any(dim=0)
        sem_seg = torch.ones(height, width, dtype=torch.int64)
        sem_seg[height // 2:] = 2
        sem_seg[things] = 0
        sem_seg[:, :4] = IGNORE
        x["sem_seg"] = sem_seg
    return batch


def _panoptic_batch(cfg, indices=(0, 1)):
    return _with_sem_seg(dataset_batch(cfg, indices=indices))


def _infer(model, cfg, indices=(0, 1)):
    inputs = dataset_batch(cfg, is_train=False, indices=indices)
    model.eval()
    with torch.no_grad():
        return inputs, model(inputs)


def test_sem_seg_targets_padded_with_the_ignore_value():
    a, b = torch.randint(0, 3, (5, 7)), torch.randint(0, 3, (6, 4))
    b[0, 0] = IGNORE
    targets = sem_seg_targets([{"sem_seg": a}, {"sem_seg": b}], [(5, 7), (6, 4)], (8, 8), 3, IGNORE, "cpu")
    assert targets.shape == (2, 8, 8) and targets.dtype == torch.int64
    assert torch.equal(targets[0, :5, :7], a) and torch.equal(targets[1, :6, :4], b)
    padding = torch.ones(2, 8, 8, dtype=torch.bool)
    padding[0, :5, :7] = padding[1, :6, :4] = False
    assert targets[padding].eq(IGNORE).all()
    with pytest.raises(ValueError, match=re.escape("MODEL.SEM_SEG_HEAD.NUM_CLASSES")):
        sem_seg_targets([{"sem_seg": a + 1}], [(5, 7)], (8, 8), 3, IGNORE, "cpu")  # label 3 of 3 classes
    with pytest.raises(ValueError, match="shape"):
        sem_seg_targets([{"sem_seg": a}], [(5, 6)], (8, 8), 3, IGNORE, "cpu")


def test_train_step_losses_and_gradients():
    cfg = tiny_cfg(BLENDMASK_YAML, PANOPTIC)
    model = build_tiny_model(cfg)
    batch = _panoptic_batch(cfg)  # two images of different sizes: the targets are padded
    assert batch[0]["image"].shape != batch[1]["image"].shape
    losses = train_step(model, batch)
    assert set(losses) == INSTANCE_LOSSES | {"loss_sem_seg"}
    assert all(math.isfinite(v) and v > 0 for v in losses.values()), losses
    missing = [name for name, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing
    assert model.panoptic_module.predictor.weight.grad.abs().sum() > 0


def test_training_without_sem_seg_is_a_clear_error():
    cfg = tiny_cfg(BLENDMASK_YAML, PANOPTIC)
    batch = _panoptic_batch(cfg)
    del batch[1]["sem_seg"]
    with pytest.raises(ValueError, match=r"'sem_seg'(.|\n)*\[1\](.|\n)*coco_2017_train_panoptic_separated"):
        train_step(build_tiny_model(cfg), batch)


def test_sem_seg_label_beyond_num_classes_is_a_clear_error():
    cfg = tiny_cfg(BLENDMASK_YAML, PANOPTIC + ["MODEL.SEM_SEG_HEAD.NUM_CLASSES", 2])
    with pytest.raises(ValueError, match=re.escape("MODEL.SEM_SEG_HEAD.NUM_CLASSES")):
        train_step(build_tiny_model(cfg), _panoptic_batch(cfg))  # stuff class 2 of 2 classes


def test_num_classes_against_the_datasets_stuff_classes():
    name = "blendmask_panoptic_test_stuff"
    MetadataCatalog.get(name).set(stuff_classes=["things", "top", "bottom", "other"])
    with pytest.raises(ValueError, match=f"NUM_CLASSES is {NUM_CLASSES} but dataset '{name}' has 4 stuff_classes"):
        build_tiny_model(tiny_cfg(BLENDMASK_YAML, PANOPTIC + ["DATASETS.TRAIN", (name,)]))
    build_tiny_model(tiny_cfg(BLENDMASK_YAML, PANOPTIC + ["DATASETS.TRAIN", (name,),
                                                          "MODEL.SEM_SEG_HEAD.NUM_CLASSES", 4]))


def test_semantic_head_features_must_exist():
    # The quick-start backbone has no P2: SemSegFPNHead would drop it silently.
    opts = SMALL[:-4] + PANOPTIC[len(SMALL):]
    with pytest.raises(ValueError, match=re.escape("MODEL.SEM_SEG_HEAD.IN_FEATURES ['p2']")):
        build_tiny_model(tiny_cfg(BLENDMASK_YAML, opts))


def test_inference_outputs_at_the_original_size():
    cfg = tiny_cfg(BLENDMASK_YAML, PANOPTIC + ["MODEL.FCOS.INFERENCE_TH_TEST", 0.0])
    model = build_tiny_model(cfg)
    inputs, outputs = _infer(model, cfg)
    with torch.no_grad():
        _, logits = model.inference(inputs, do_postprocess=False)  # (N, C, H', W') over the padded batch
    for inp, out, image_logits in zip(inputs, outputs, logits):
        # The image's part of the padded logits, resized to the original size.
        size = inp["image"].shape[-2:]
        expected = F.interpolate(image_logits[None, :, : size[0], : size[1]], size=(inp["height"], inp["width"]),
                                 mode="bilinear", align_corners=False)[0]
        assert torch.allclose(out["sem_seg"], expected)
        height, width = inp["height"], inp["width"]
        assert (height, width) != tuple(inp["image"].shape[-2:])  # resized by the test-time resize
        assert list(out) == ["instances", "sem_seg", "panoptic_seg"]
        assert out["instances"].image_size == (height, width) and len(out["instances"]) > 0
        assert out["sem_seg"].shape == (NUM_CLASSES, height, width) and out["sem_seg"].is_floating_point()
        ids, segments = out["panoptic_seg"]
        assert ids.shape == (height, width) and ids.dtype == torch.int32
        assert [s["id"] for s in segments] == list(range(1, len(segments) + 1))
        assert set(ids.unique().tolist()) <= {0, *range(1, len(segments) + 1)}


def test_combination_equals_detectron2s():
    cfg = tiny_cfg(BLENDMASK_YAML, PANOPTIC + ["MODEL.FCOS.INFERENCE_TH_TEST", 0.0])
    _, outputs = _infer(build_tiny_model(cfg), cfg)
    kinds = set()
    for out in outputs:
        instances, labels = out["instances"], out["sem_seg"].argmax(dim=0)
        ids, segments = out["panoptic_seg"]
        ref_ids, ref_segments = combine_semantic_and_instance_outputs(instances, labels, OVERLAP, STUFF_AREA, SCORE)
        assert torch.equal(ids, ref_ids) and segments == ref_segments
        kinds |= {s["isthing"] for s in segments}
        for segment in segments:
            pixels = ids == segment["id"]
            if segment["isthing"]:
                assert not (pixels & ~instances.pred_masks[segment["instance_id"]]).any()
                assert segment["category_id"] == int(instances.pred_classes[segment["instance_id"]])
            else:
                assert segment["category_id"] != 0 and labels[pixels].eq(segment["category_id"]).all()
                assert segment["area"] == int(pixels.sum()) >= STUFF_AREA
        # Detectron2's default thresholds give another result: the configured ones are those used.
        default_ids, _ = combine_semantic_and_instance_outputs(instances, labels, 0.5, 4096, 0.5)
        assert not torch.equal(ids, default_ids)
    assert kinds == {True, False}


def test_zero_detections_give_stuff_only():
    cfg = tiny_cfg(BLENDMASK_YAML, PANOPTIC + ["MODEL.FCOS.INFERENCE_TH_TEST", 1.0])
    _, outputs = _infer(build_tiny_model(cfg), cfg)
    for out in outputs:
        assert len(out["instances"]) == 0
        labels = out["sem_seg"].argmax(dim=0)
        expected_ids, expected_segments = torch.zeros(labels.shape, dtype=torch.int32), []
        for label in range(1, NUM_CLASSES):  # class 0 (things) never becomes a segment
            pixels = labels == label
            if pixels.sum() >= STUFF_AREA:
                expected_segments.append({"id": len(expected_segments) + 1, "isthing": False, "category_id": label,
                                          "area": int(pixels.sum())})
                expected_ids[pixels] = len(expected_segments)
        ids, segments = out["panoptic_seg"]
        assert torch.equal(ids, expected_ids) and segments == expected_segments and segments


def test_combine_disabled_is_the_instance_model():
    """COMBINE.ENABLED False: no semantic head, instance outputs and losses only, "sem_seg" unused; and the
    panoptic model with the same weights predicts the same instances."""
    cfg_off = tiny_cfg(BLENDMASK_YAML, SMALL + ["MODEL.FCOS.INFERENCE_TH_TEST", 0.0])
    model_off = build_tiny_model(cfg_off)
    assert model_off.panoptic_module is None and not any("panoptic" in k for k in model_off.state_dict())
    losses = train_step(model_off, dataset_batch(cfg_off))  # no "sem_seg" needed
    assert set(losses) == INSTANCE_LOSSES
    inputs, outputs_off = _infer(model_off, cfg_off)
    assert all(list(out) == ["instances"] for out in outputs_off)
    with torch.no_grad():
        assert isinstance(model_off.inference(inputs, do_postprocess=False), list)

    cfg_on = tiny_cfg(BLENDMASK_YAML, PANOPTIC + ["MODEL.FCOS.INFERENCE_TH_TEST", 0.0])
    model_on = build_tiny_model(cfg_on, seed=1)
    incompatible = model_on.load_state_dict(model_off.state_dict(), strict=False)
    assert incompatible.missing_keys and all(k.startswith("panoptic_module.") for k in incompatible.missing_keys)
    _, outputs_on = _infer(model_on, cfg_on)
    for off, on in zip(outputs_off, outputs_on):
        a, b = off["instances"], on["instances"]
        assert len(a) > 0
        for field in ("scores", "pred_classes", "pred_masks"):
            assert torch.equal(a.get(field), b.get(field)), field
        assert torch.equal(a.pred_boxes.tensor, b.pred_boxes.tensor)
    with torch.no_grad():
        instances, logits = model_on.inference(inputs, do_postprocess=False)
    assert len(instances) == 2 and logits.shape[:2] == (2, NUM_CLASSES)
    with pytest.raises(ValueError, match="COMBINE.ENABLED False"):
        check_exportable(model_on)


def test_checkpoint_round_trip(tmp_path):
    cfg = tiny_cfg(BLENDMASK_YAML, PANOPTIC + ["MODEL.FCOS.INFERENCE_TH_TEST", 0.0])
    model = build_tiny_model(cfg)
    train_step(model, _panoptic_batch(cfg))  # BN statistics leave their init
    other = checkpoint_round_trip(model.eval(), cfg, str(tmp_path))
    ours, theirs = model.state_dict(), other.state_dict()
    assert ours.keys() == theirs.keys() and any(k.startswith("panoptic_module.") for k in ours)
    assert all(torch.equal(value, theirs[name]) for name, value in ours.items())
    _, (a, *_) = _infer(model, cfg)
    _, (b, *_) = _infer(other, cfg)
    assert len(a["instances"]) > 0 and torch.equal(a["instances"].pred_masks, b["instances"].pred_masks)
    assert torch.equal(a["sem_seg"], b["sem_seg"])
    assert torch.equal(a["panoptic_seg"][0], b["panoptic_seg"][0]) and a["panoptic_seg"][1] == b["panoptic_seg"][1]


def _adelaidet_semantic_head_keys(num_classes=54, channels=128, fpn_channels=256, res2_channels=256):
    """AdelaiDet's ``panoptic_module`` is Detectron2's SemSegFPNHead (COMMON_STRIDE 4, GN): per level pK a
    Sequential of max(1, K - 2) conv + GN (no conv bias) with an x2 upsampling after each conv above P2, so the
    convs sit at even indices; then a 1x1 ``predictor``. Written out here independently of the model."""
    keys = OrderedDict()
    for level in (2, 3, 4, 5):
        for conv in range(max(1, level - 2)):
            prefix = f"panoptic_module.p{level}.{2 * conv if level > 2 else conv}"
            keys[f"{prefix}.weight"] = (channels, fpn_channels if conv == 0 else channels, 3, 3)
            keys[f"{prefix}.norm.weight"] = keys[f"{prefix}.norm.bias"] = (channels,)
    keys["panoptic_module.predictor.weight"] = (num_classes, channels, 1, 1)
    keys["panoptic_module.predictor.bias"] = (num_classes,)
    # P2 of the FPN (res2 in FPN.IN_FEATURES): Detectron2's FPN names, not in the instance model's list.
    keys["backbone.fpn_lateral2.weight"] = (fpn_channels, res2_channels, 1, 1)
    keys["backbone.fpn_output2.weight"] = (fpn_channels, fpn_channels, 3, 3)
    keys["backbone.fpn_lateral2.bias"] = keys["backbone.fpn_output2.bias"] = (fpn_channels,)
    return keys


def test_adelaidet_panoptic_checkpoint_loads(tmp_path):
    """A fake AdelaiDet panoptic BlendMask R-50 checkpoint (the instance model's .tsv names, the semantic head's
    and P2's written out) loads through DetectionCheckpointer, the semantic head under the same names."""
    cfg = tiny_cfg(config_path("BlendMask/Panoptic/R_50_1x.yaml"), ["INPUT.MIN_SIZE_TEST", 64,
                                                                     "INPUT.MAX_SIZE_TEST", 96])
    model = build_tiny_model(cfg).eval()
    torch.manual_seed(0)
    state = OrderedDict((name, torch.randint(0, 100, shape) if dtype == "int64" else random_weight(name, shape))
                        for name, shape, dtype in read_reference_keys("adelaidet_keys/blendmask.tsv"))
    extra = OrderedDict((name, random_weight(name, shape)) for name, shape in _adelaidet_semantic_head_keys().items())
    state.update(extra)
    state.update(fake_bottom_up_state(model))
    torch.save(state, tmp_path / "panoptic_R_50_1x.pth")
    assert {k for k in model.state_dict() if k.startswith("panoptic_module.")} == {
        k for k in extra if k.startswith("panoptic_module.")}
    initial = {name: value.clone() for name, value in model.state_dict().items()}
    DetectionCheckpointer(model).load(str(tmp_path / "panoptic_R_50_1x.pth"))
    ours = model.state_dict()
    # Every parameter and float buffer of the model came from the checkpoint.
    assert not [name for name, value in ours.items() if value.is_floating_point() and torch.equal(value, initial[name])]
    for name, value in extra.items():
        assert torch.equal(ours[name], value), name
    inputs = [{"image": torch.randint(0, 256, (3, 64, 80), dtype=torch.uint8), "height": 64, "width": 80}]
    with torch.no_grad():
        (out,) = model(inputs)
    assert out["sem_seg"].shape == (54, 64, 80)
