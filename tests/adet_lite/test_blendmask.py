"""BlendMask pieces against per-instance loop references, and the model end to end on the built-in
dataset (CPU)."""
import math

import pytest
import torch
import torch.nn.functional as F
from detectron2.structures import BitMasks, Boxes, Instances

from adet_lite.blendmask import Blender, blend, blender_mask_loss
from adet_lite.blendmask.basis_module import ProtoNet
from adet_lite.blendmask.blendmask import thing_semantic_targets
from d2ext.testing import (
    assert_checkpoint_round_trip, assert_instance_predictions, assert_losses_fall, bilinear_resize_reference,
    build_tiny_model, config_path, dataset_batch, loss_history, predict, tiny_cfg, train_step, visible_blendmask_masks)


BLENDMASK_YAML = config_path("quickstart/blendmask_R18_synthetic.yaml")
# Test-sized on top of the quick-start config: ~100 px inputs, one conv per tower.
SMALL = ["INPUT.MIN_SIZE_TEST", 96, "INPUT.MAX_SIZE_TEST", 144, "MODEL.FCOS.NUM_CLS_CONVS", 1,
         "MODEL.FCOS.NUM_BOX_CONVS", 1, "MODEL.BASIS_MODULE.NUM_CONVS", 1, "MODEL.BASIS_MODULE.CONVS_DIM", 32]


def _bilinear(feature, y, x):
    """torchvision's RoIAlign sample of a (H, W) map at continuous (y, x): 0 beyond one pixel outside,
    coordinates clamped to the map, bilinear inside."""
    height, width = feature.shape
    if y < -1.0 or y > height or x < -1.0 or x > width:
        return 0.0
    y, x = max(y, 0.0), max(x, 0.0)
    y0, x0 = int(math.floor(y)), int(math.floor(x))
    if y0 >= height - 1:
        y0 = y1 = height - 1
        y = float(y0)
    else:
        y1 = y0 + 1
    if x0 >= width - 1:
        x0 = x1 = width - 1
        x = float(x0)
    else:
        x1 = x0 + 1
    ly, lx = y - y0, x - x0
    return ((1 - ly) * (1 - lx) * feature[y0, x0] + (1 - ly) * lx * feature[y0, x1]
            + ly * (1 - lx) * feature[y1, x0] + ly * lx * feature[y1, x1]).item()


def _roi_align_v2(feature, box, scale, size):
    """Aligned RoIAlign with one sample per bin (its centre): the half-pixel shift of ROIAlignV2."""
    x0, y0, x1, y1 = (v * scale - 0.5 for v in box.tolist())
    bin_h, bin_w = (y1 - y0) / size, (x1 - x0) / size
    return torch.tensor([[_bilinear(feature, y0 + (i + 0.5) * bin_h, x0 + (j + 0.5) * bin_w)
                          for j in range(size)] for i in range(size)])


def _loop_blend(bases, image_of_box, boxes, attns, num_bases, attn_size, resolution, scale):
    """Each instance on its own: crop every basis, resize every attention, softmax over the bases at
    each pixel, weighted sum."""
    masks = []
    for n in range(len(boxes)):
        crops = [_roi_align_v2(bases[image_of_box[n], k], boxes[n], scale, resolution) for k in range(num_bases)]
        maps = attns[n].reshape(num_bases, attn_size, attn_size)
        resized = torch.stack([bilinear_resize_reference(maps[k], (resolution, resolution)) for k in range(num_bases)])
        weights = resized.exp() / resized.exp().sum(dim=0, keepdim=True)
        masks.append(sum(weights[k] * crops[k] for k in range(num_bases)))
    return torch.stack(masks)


def _small_blender():
    return Blender(attn_size=3, resolution=6, pooler_scales=(0.25,), sampling_ratio=1, pooler_type="ROIAlignV2")


def test_blender_equals_per_instance_loop():
    torch.manual_seed(0)
    bases = torch.randn(2, 3, 10, 12)  # stride 4: a 40 x 48 input
    boxes = [Boxes(torch.tensor([[4.0, 6.0, 30.0, 22.0], [-6.0, 30.0, 20.0, 44.0]])),  # one partly outside
             Boxes(torch.tensor([[10.0, 2.0, 47.0, 39.0]]))]
    attns = torch.randn(3, 3 * 3 * 3)
    blender = _small_blender()
    rois = blender.crop(bases, boxes)
    assert rois.shape == (3, 3, 6, 6)
    logits = blender(rois, attns)
    expected = _loop_blend(bases, [0, 0, 1], torch.cat([b.tensor for b in boxes]), attns, 3, 3, 6, 0.25)
    assert torch.allclose(logits, expected, atol=1e-5)


def test_blender_without_instances():
    bases = torch.randn(2, 4, 8, 8, requires_grad=True)
    blender = _small_blender()
    rois = blender.crop(bases, [Boxes(torch.zeros(0, 4)), Boxes(torch.zeros(0, 4))])
    attns = torch.zeros(0, 4 * 9, requires_grad=True)
    logits = blender(rois, attns)
    assert logits.shape == (0, 6, 6)
    loss = blender_mask_loss(logits, torch.zeros(0, 6, 6), torch.zeros(0), 1e-6)
    loss.backward()  # no positive: a zero loss that still reaches the bases and the attentions
    assert loss.item() == 0 and bases.grad is not None and attns.grad is not None
    with pytest.raises(ValueError, match="attentions"):
        blend(torch.zeros(2, 4, 6, 6), torch.zeros(2, 3 * 9), attn_size=3)


def test_mask_loss_matches_loop():
    torch.manual_seed(1)
    logits, targets = torch.randn(3, 4, 4), (torch.rand(3, 4, 4) > 0.5).float()
    weights = torch.tensor([0.2, 0.9, 0.5])
    expected = 0.0
    for n in range(3):
        bce = [-(t * math.log(1 / (1 + math.exp(-x))) + (1 - t) * math.log(1 - 1 / (1 + math.exp(-x))))
               for x, t in zip(logits[n].flatten().tolist(), targets[n].flatten().tolist())]
        expected += weights[n].item() * sum(bce) / len(bce)
    assert blender_mask_loss(logits, targets, weights, 1.6).item() == pytest.approx(expected / 1.6, rel=1e-5)


def test_model_mask_loss_uses_gt_boxes_and_centerness_weights():
    cfg = tiny_cfg(BLENDMASK_YAML, SMALL + ["MODEL.BLENDMASK.ATTN_SIZE", 3, "MODEL.BLENDMASK.BOTTOM_RESOLUTION", 8])
    model = build_tiny_model(cfg)
    torch.manual_seed(2)
    bases = torch.randn(2, 4, 16, 16)
    gts = []
    for box in ([8.0, 8.0, 40.0, 40.0], [16.0, 4.0, 48.0, 60.0]):
        gt = Instances((64, 64))
        gt.gt_boxes = Boxes(torch.tensor([box]))
        x0, y0, x1, y1 = (int(v) for v in box)
        mask = torch.zeros(1, 64, 64, dtype=torch.bool)
        mask[0, y0:y1, x0:(x0 + x1) // 2] = True  # the left half of the box
        gt.gt_masks = BitMasks(mask)
        gts.append(gt)
    positives = Instances((0, 0))
    positives.gt_inds = torch.tensor([0, 1, 1])  # into the concatenated ground truth of the batch
    positives.reg_targets = torch.tensor([[1.0, 2.0, 3.0, 2.0], [2.0, 2.0, 2.0, 2.0], [1.0, 4.0, 1.0, 1.0]])
    positives.top_feats = torch.randn(3, 4 * 9)
    loss = model.mask_loss(bases, positives, gts)

    boxes = torch.cat([g.gt_boxes.tensor for g in gts])
    logits = _loop_blend(bases, [0, 1, 1], boxes[positives.gt_inds], positives.top_feats, 4, 3, 8, 0.25)
    target = torch.zeros(8, 8)
    target[:, :4] = 1.0
    ctr = [math.sqrt(min(l, r) / max(l, r) * min(t, b) / max(t, b)) for l, t, r, b in positives.reg_targets.tolist()]
    bce = [F.binary_cross_entropy_with_logits(logits[n], target).item() for n in range(3)]
    expected = sum(c * b for c, b in zip(ctr, bce)) / sum(ctr)
    assert loss.item() == pytest.approx(expected, rel=1e-4)


def test_thing_semantic_targets_match_loop():
    inst = Instances((14, 16))
    masks = torch.zeros(2, 14, 16, dtype=torch.bool)
    masks[0, 0:12, 0:12] = True
    masks[1, 4:8, 4:16] = True  # smaller: wins where they overlap
    inst.gt_masks = BitMasks(masks)
    inst.gt_classes = torch.tensor([2, 0])
    empty = Instances((14, 16))
    empty.gt_masks = BitMasks(torch.zeros(0, 14, 16, dtype=torch.bool))
    empty.gt_classes = torch.zeros(0, dtype=torch.int64)
    targets = thing_semantic_targets([inst, empty], (16, 16), num_classes=3, stride=4)
    assert targets.shape == (2, 4, 4) and targets[1].eq(0).all()
    for i in range(4):
        for j in range(4):
            y, x = 4 * i + 2, 4 * j + 2
            covering = [(masks[k].sum().item(), int(inst.gt_classes[k])) for k in range(2)
                        if y < 14 and masks[k, y, x]]
            assert targets[0, i, j].item() == (min(covering)[1] + 1 if covering else 0)
    with pytest.raises(ValueError, match="MODEL.BASIS_MODULE.NUM_CLASSES"):
        thing_semantic_targets([inst], (16, 16), num_classes=2, stride=4)


def test_basis_module_stride_and_semantic_loss():
    cfg = tiny_cfg(BLENDMASK_YAML, SMALL + ["MODEL.BASIS_MODULE.NORM", "SyncBN"])
    model = build_tiny_model(cfg)
    basis = model.basis_module
    assert isinstance(basis, ProtoNet) and basis.out_stride == 4
    # SyncBN fails outside a process group: one process runs plain BN (same parameter names).
    norms = [m for m in basis.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert norms and not any(isinstance(m, torch.nn.SyncBatchNorm) for m in norms)
    features = {f"p{level}": torch.randn(2, 64, 64 // 2 ** level, 96 // 2 ** level) for level in (3, 4, 5)}
    targets = torch.randint(0, 5, (2, 8, 12))
    bases, losses = basis.train()(features, targets)
    assert bases.shape == (2, 4, 16, 24)
    logits = basis.semantic_logits(basis.semantic_tower(features["p3"]))
    log_probs = logits.log_softmax(dim=1)
    nll = [-log_probs[n, targets[n, i, j], i, j].item() for n in range(2) for i in range(8) for j in range(12)]
    assert losses["loss_basis_sem"].item() == pytest.approx(0.3 * sum(nll) / len(nll), rel=1e-3)
    with pytest.raises(ValueError, match="semantic targets"):
        basis(features, targets[:, :4])


def test_train_step_with_an_empty_image_and_no_positive():
    cfg = tiny_cfg(BLENDMASK_YAML, SMALL + ["MODEL.BASIS_MODULE.NORM", "SyncBN"])  # AdelaiDet's default norm
    model = build_tiny_model(cfg)
    batch = dataset_batch(cfg, indices=(0, 1))
    batch[0]["instances"] = batch[0]["instances"][:0]  # an image without annotations
    losses = train_step(model, batch)
    assert set(losses) == {"loss_fcos_cls", "loss_fcos_loc", "loss_fcos_ctr", "loss_mask", "loss_basis_sem"}
    assert all(math.isfinite(v) and v > 0 for v in losses.values()), losses
    assert model.top_layer.weight.grad.abs().sum() > 0
    assert model.basis_module.tower[-1].weight.grad.abs().sum() > 0

    model.zero_grad()
    empty_batch = dataset_batch(cfg, indices=(0,))
    empty_batch[0]["instances"] = empty_batch[0]["instances"][:0]
    losses = train_step(model, empty_batch)  # no positive at all
    assert losses["loss_mask"] == 0 and losses["loss_fcos_loc"] == 0 and math.isfinite(losses["loss_basis_sem"])
    assert model.top_layer.weight.grad is not None  # still in the graph (distributed training)


def test_inference_masks_at_original_size():
    cfg = tiny_cfg(BLENDMASK_YAML, SMALL + ["MODEL.FCOS.INFERENCE_TH_TEST", 0.0])
    inputs, instances = predict(visible_blendmask_masks(build_tiny_model(cfg)), cfg, indices=(0, 1))
    for inp, inst in zip(inputs, instances):
        assert_instance_predictions(inst, inp["height"], inp["width"])
        areas = inst.pred_masks.flatten(1).sum(dim=1)
        assert (areas > 0).float().mean() > 0.5, areas  # the check below has pixels to look at
        # Pasted RoI masks: nothing outside the (scaled, clipped) box.
        for box, mask in zip(inst.pred_boxes.tensor, inst.pred_masks):
            outside = mask.clone()
            outside[int(box[1]):int(math.ceil(box[3])) + 1, int(box[0]):int(math.ceil(box[2])) + 1] = False
            assert not outside.any()


def test_zero_detections():
    cfg = tiny_cfg(BLENDMASK_YAML, SMALL + ["MODEL.FCOS.INFERENCE_TH_TEST", 1.0])
    (inp,), (inst,) = predict(build_tiny_model(cfg), cfg)
    assert len(inst) == 0
    assert inst.pred_masks.shape == (0, inp["height"], inp["width"]) and inst.pred_masks.dtype == torch.bool


@pytest.mark.parametrize("opts, message", [
    (["MODEL.BLENDMASK.TOP_INTERP", "linear"], "TOP_INTERP"),
    (["MODEL.BLENDMASK.POOLER_SCALES", (0.125,)], "POOLER_SCALES"),
    (["MODEL.BASIS_MODULE.COMMON_STRIDE", 4], "COMMON_STRIDE"),
    (["MODEL.BASIS_MODULE.IN_FEATURES", ["p2", "p3"]], "BASIS_MODULE.IN_FEATURES"),
    (["MODEL.BASIS_MODULE.NAME", "Unknown"], "Unknown"),
    (["MODEL.BLENDMASK.VISUALIZE", True], "VISUALIZE"),
])
def test_bad_config_values_are_clear_errors(opts, message):
    with pytest.raises((ValueError, KeyError), match=message):
        build_tiny_model(tiny_cfg(BLENDMASK_YAML, SMALL + opts))


def test_training_without_masks_is_a_clear_error():
    cfg = tiny_cfg(BLENDMASK_YAML, SMALL)
    model = build_tiny_model(cfg)
    batch = dataset_batch(cfg, indices=(0,))
    batch[0]["instances"].remove("gt_masks")
    with pytest.raises(ValueError, match="MASK_ON"):
        train_step(model, batch)


def test_checkpoint_round_trip(tmp_path):
    cfg = tiny_cfg(BLENDMASK_YAML, SMALL + ["MODEL.FCOS.INFERENCE_TH_TEST", 0.0])
    assert_checkpoint_round_trip(cfg, str(tmp_path), fields=("pred_masks", "scores"), prepare=visible_blendmask_masks)


def test_overfit_losses_fall():
    cfg = tiny_cfg(BLENDMASK_YAML, SMALL)
    history = loss_history(build_tiny_model(cfg), dataset_batch(cfg, indices=(0, 1)), iterations=20, lr=0.02)
    assert_losses_fall(history, 0.5, loss_mask=0.8)
