"""SOLO, Decoupled SOLO, Decoupled SOLO Light and SOLOv2 end to end on CPU: train step, inference,
images without instances, bitmask inputs, checkpoint round trip, reference checkpoints, a short overfit."""
import copy

import pytest
import torch
from detectron2.structures import BitMasks, Instances

from d2ext.testing import (assert_checkpoint_round_trip, build_tiny_model, config_path, dataset_batch, tiny_cfg,
                           train_step)

SOLO_CFG = "quickstart/solo_R18_FPN_synthetic.yaml"
SOLOV2_CFG = "quickstart/solov2_R18_FPN_synthetic.yaml"
# Smaller than the quick-start models: 96-128 px images, 32 channels, one conv per tower.
SMALL = ["INPUT.MIN_SIZE_TEST", "96", "INPUT.MAX_SIZE_TEST", "128", "MODEL.FPN.OUT_CHANNELS", "32"]
SMALL_SOLO = ["MODEL.SOLO.INSTANCE_CHANNELS", "32", "MODEL.SOLO.NUM_INSTANCE_CONVS", "1"]
SMALL_SOLOV2 = ["MODEL.SOLOV2.INSTANCE_IN_CHANNELS", "32", "MODEL.SOLOV2.MASK_IN_CHANNELS", "32",
                "MODEL.SOLOV2.INSTANCE_CHANNELS", "32", "MODEL.SOLOV2.NUM_INSTANCE_CONVS", "1",
                "MODEL.SOLOV2.NUM_KERNELS", "32", "MODEL.SOLOV2.NUM_MASKS", "32"]
VARIANTS = {
    "SOLO": (SOLO_CFG, [*SMALL_SOLO, "MODEL.SOLO.VARIANT", "SOLO"], "SOLO"),
    "DecoupledSOLO": (SOLO_CFG, [*SMALL_SOLO, "MODEL.SOLO.VARIANT", "DecoupledSOLO"], "SOLO"),
    "DecoupledSOLOLight": (SOLO_CFG, [*SMALL_SOLO, "MODEL.SOLO.VARIANT", "DecoupledSOLOLight"], "SOLO"),
    "SOLOv2": (SOLOV2_CFG, SMALL_SOLOV2, "SOLOV2"),
    "SOLOv2, stride-2 masks": (SOLOV2_CFG, [*SMALL_SOLOV2, "MODEL.SOLOV2.MASK_OUT_STRIDE", "2"], "SOLOV2"),
    "SOLOv2, relative coordinate terms": (SOLOV2_CFG, [*SMALL_SOLOV2, "MODEL.SOLOV2.RELATIVE_COORD_TERMS", "True"],
                                          "SOLOV2"),
}
# Random weights give no detection at the released thresholds: accept every candidate.
ACCEPT_ALL = ["SCORE_THR", "0.0", "MASK_THR", "0.00001", "UPDATE_THR", "0.0"]


def _cfg(variant, opts=()):
    config, variant_opts, node = VARIANTS[variant]
    return tiny_cfg(config_path(config), [*SMALL, *variant_opts, *opts])


def _accept_all(variant):
    node = VARIANTS[variant][2]
    return [item if i % 2 else f"MODEL.{node}.{item}" for i, item in enumerate(ACCEPT_ALL)]


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_train_step_and_inference(variant):
    cfg = _cfg(variant, _accept_all(variant))
    model = build_tiny_model(cfg)
    batch = dataset_batch(cfg)
    losses = train_step(model, batch)
    assert set(losses) == {"loss_mask", "loss_cls"}
    assert all(torch.isfinite(torch.tensor(v)) and v > 0 for v in losses.values())
    assert all(p.grad is not None for n, p in model.named_parameters() if "mask_branch" in n or "category" in n)
    if cfg.MODEL.SOLOV2.RELATIVE_COORD_TERMS:  # the coefficients' output channels of the kernel predictor
        assert model.mask_branch.kernel_branch.predictor.weight.grad[-4:].abs().sum() > 0

    model.eval()
    inputs = dataset_batch(cfg, indices=(0,), is_train=False)
    with torch.no_grad():
        instances = model(inputs)[0]["instances"]
    height, width = inputs[0]["height"], inputs[0]["width"]
    assert instances.image_size == (height, width)
    assert len(instances) > 0
    assert instances.pred_masks.shape == (len(instances), height, width) and instances.pred_masks.dtype == torch.bool
    assert set(instances.get_fields()) == {"pred_masks", "scores", "pred_classes", "pred_boxes"}
    # Boxes are the tight boxes of the final masks.
    assert torch.equal(instances.pred_boxes.tensor, BitMasks(instances.pred_masks).get_bounding_boxes().tensor)
    assert (instances.scores[:-1] >= instances.scores[1:]).all()


def test_inference_without_height_width_and_with_zero_detections():
    cfg = _cfg("SOLO")  # released thresholds: random weights detect nothing
    model = build_tiny_model(cfg).eval()
    inputs = [{"image": x["image"]} for x in dataset_batch(cfg, indices=(0, 1), is_train=False)]
    with torch.no_grad():
        outputs = model(inputs)
    for x, out in zip(inputs, outputs):
        assert len(out["instances"]) == 0
        assert out["instances"].image_size == tuple(x["image"].shape[-2:])
        assert out["instances"].pred_masks.shape == (0, *x["image"].shape[-2:])


@pytest.mark.parametrize("variant", ["DecoupledSOLO", "SOLOv2"])
def test_batch_with_an_image_without_instances_and_bitmask_masks(variant):
    cfg = _cfg(variant)
    model = build_tiny_model(cfg)
    batch = dataset_batch(cfg)
    empty = copy.deepcopy(batch[0])
    empty["instances"] = empty["instances"][[]]
    # The other image with bitmask masks (INPUT.MASK_FORMAT bitmask).
    bitmask = copy.deepcopy(batch[1])
    h, w = bitmask["instances"].image_size
    bitmask["instances"].gt_masks = BitMasks.from_polygon_masks(bitmask["instances"].gt_masks, h, w)
    losses = train_step(model, [empty, bitmask])
    assert all(torch.isfinite(torch.tensor(v)) for v in losses.values())
    # Only images without instances: no positive, the losses are still defined and backpropagate.
    losses = train_step(model, [empty])
    assert losses["loss_mask"] == 0.0 and losses["loss_cls"] > 0


def test_degenerate_instance_mask_is_ignored_and_missing_masks_is_a_clear_error():
    cfg = _cfg("SOLO")
    model = build_tiny_model(cfg)
    batch = dataset_batch(cfg, indices=(0,))
    item = batch[0]
    h, w = item["instances"].image_size
    bitmasks = BitMasks.from_polygon_masks(item["instances"].gt_masks, h, w)
    bitmasks.tensor[0] = False  # an instance whose mask vanished
    item["instances"].gt_masks = bitmasks
    assert all(torch.isfinite(torch.tensor(v)) for v in train_step(model, batch).values())
    no_masks = Instances((h, w), gt_boxes=item["instances"].gt_boxes, gt_classes=item["instances"].gt_classes)
    with pytest.raises(ValueError, match="gt_masks"):
        train_step(model, [{"image": item["image"], "instances": no_masks}])


def test_bad_config_values_are_named():
    with pytest.raises(ValueError, match="MODEL.SOLO.VARIANT"):
        build_tiny_model(_cfg("SOLO", ["MODEL.SOLO.VARIANT", "SOLOv3"]))
    with pytest.raises(ValueError, match="MODEL.SOLO.NUM_GRIDS"):
        build_tiny_model(_cfg("SOLO", ["MODEL.SOLO.NUM_GRIDS", "[12, 8]"]))
    with pytest.raises(ValueError, match="MODEL.SOLOV2.NMS_TYPE"):
        build_tiny_model(_cfg("SOLOv2", ["MODEL.SOLOV2.NMS_TYPE", "soft"]))
    with pytest.raises(ValueError, match="INSTANCE_IN_CHANNELS"):
        build_tiny_model(_cfg("SOLOv2", ["MODEL.SOLOV2.INSTANCE_IN_CHANNELS", "64"]))
    with pytest.raises(ValueError, match="MODEL.SOLOV2.MASK_OUT_STRIDE"):
        build_tiny_model(_cfg("SOLOv2", ["MODEL.SOLOV2.MASK_OUT_STRIDE", "3"]))


def test_area_filter_counts_pixels_of_stride_4_masks_at_any_mask_stride(monkeypatch):
    import adet_lite.solo.meta_arch as meta_arch

    min_areas = []

    def select_and_record(category_scores, level_min_areas, *args):
        min_areas.append(list(level_min_areas))
        return select_instances(category_scores, level_min_areas, *args)

    select_instances = meta_arch.select_instances
    monkeypatch.setattr(meta_arch, "select_instances", select_and_record)
    for mask_stride, pixels_per_stride_4_pixel in ((4, 1), (2, 4)):
        cfg = _cfg("SOLOv2", ["MODEL.SOLOV2.MASK_OUT_STRIDE", str(mask_stride)])
        model = build_tiny_model(cfg).eval()
        with torch.no_grad():
            model(dataset_batch(cfg, indices=(0,), is_train=False))
        assert min_areas[-1] == [s * pixels_per_stride_4_pixel for s in model.instance_strides]


@pytest.mark.parametrize("variant", ["SOLOv2", "SOLOv2, relative coordinate terms"])
def test_checkpoint_round_trip(variant, tmp_path):
    assert_checkpoint_round_trip(_cfg(variant, _accept_all(variant)), str(tmp_path), fields=("pred_masks", "scores"))


def test_short_overfit_on_synthetic_shapes():
    cfg = _cfg("SOLO")
    model = build_tiny_model(cfg)
    batch = dataset_batch(cfg, indices=(0,))
    # Adam: the Dice gradient through the prior-initialised (p = 0.01) mask logits is small for plain SGD.
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    history = [train_step(model, batch, optimizer) for _ in range(20)]
    first, last = history[0], history[-1]
    assert sum(last.values()) < 0.6 * sum(first.values()), history
    assert last["loss_mask"] < 0.8 * first["loss_mask"], history
