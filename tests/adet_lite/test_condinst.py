"""CondInst pieces against loop references, and the model end to end on the built-in dataset (CPU)."""
import math

import numpy as np
import pytest
import torch
from detectron2.structures import Boxes, Instances, PolygonMasks

from adet_lite.condinst.condinst import add_bitmask_targets
from adet_lite.condinst.dynamic_mask_head import DynamicMaskHead, relative_coordinates
from adet_lite.condinst.mask_branch import semantic_targets
from adet_lite.condinst.sampling import sample_positives
from adet_lite.fcos.targets import compute_locations
from d2ext.layers import aligned_bilinear
from d2ext.testing import (
    assert_checkpoint_round_trip, assert_instance_predictions, assert_losses_fall, build_tiny_model,
    config_path, dataset_batch, loss_history, predict, tiny_cfg, train_step)


CONDINST_YAML = config_path("quickstart/condinst_R18_synthetic.yaml")
# Test-sized on top of the quick-start config: ~100 px inputs, one conv per tower.
SMALL = ["INPUT.MIN_SIZE_TEST", 96, "INPUT.MAX_SIZE_TEST", 144, "MODEL.FCOS.NUM_CLS_CONVS", 1,
         "MODEL.FCOS.NUM_BOX_CONVS", 1, "MODEL.CONDINST.MASK_BRANCH.NUM_CONVS", 2]


def _loop_aligned_bilinear(x, factor):
    """Output pixel p samples input coordinate (p - factor // 2) / factor, clamped to the map."""
    height, width = x.shape[-2:]
    out = torch.zeros(*x.shape[:2], height * factor, width * factor)
    for p in range(height * factor):
        cy = min(max((p - factor // 2) / factor, 0.0), height - 1)
        y0 = int(math.floor(cy))
        y1, wy = min(y0 + 1, height - 1), cy - y0
        for q in range(width * factor):
            cx = min(max((q - factor // 2) / factor, 0.0), width - 1)
            x0 = int(math.floor(cx))
            x1, wx = min(x0 + 1, width - 1), cx - x0
            out[..., p, q] = ((1 - wy) * (1 - wx) * x[..., y0, x0] + (1 - wy) * wx * x[..., y0, x1]
                              + wy * (1 - wx) * x[..., y1, x0] + wy * wx * x[..., y1, x1])
    return out


@pytest.mark.parametrize("factor", [2, 4])
def test_aligned_bilinear_matches_loop(factor):
    x = torch.randn(1, 2, 3, 5)
    assert torch.allclose(aligned_bilinear(x, factor), _loop_aligned_bilinear(x, factor), atol=1e-5)
    with pytest.raises(ValueError, match="factor"):
        aligned_bilinear(x, 0)


def test_relative_coordinates_match_loop():
    instance_locations = torch.tensor([[12.0, 20.0], [100.0, 4.0]])
    pixels = compute_locations(2, 3, 8, "cpu")
    soi = torch.tensor([64, 128])
    coords = relative_coordinates(instance_locations, pixels, soi)
    for n in range(2):
        for k, (px, py) in enumerate(pixels.tolist()):
            assert coords[n, 0, k].item() == pytest.approx((instance_locations[n, 0].item() - px) / soi[n].item())
            assert coords[n, 1, k].item() == pytest.approx((instance_locations[n, 1].item() - py) / soi[n].item())


def _head(disable_rel_coords=False):
    return DynamicMaskHead(in_channels=8, channels=8, num_layers=3, sizes_of_interest=[64, 128, 256, 512, 1024],
                           mask_out_stride=4, disable_rel_coords=disable_rel_coords)


def _loop_dynamic_head(head, mask_feats, stride, inst):
    """Each instance on its own: unpack its parameters (weights of every layer, row-major (out, in),
    then the biases) and apply the 1x1 convs as per-pixel matrix products."""
    height, width = mask_feats.shape[-2:]
    outputs = []
    for n in range(len(inst)):
        x = mask_feats[inst.im_inds[n]].reshape(mask_feats.shape[1], -1)
        if not head.disable_rel_coords:
            rel = []
            for i in range(height):
                for j in range(width):
                    px, py = j * stride + stride // 2, i * stride + stride // 2
                    soi = float(head.sizes_of_interest[inst.fpn_levels[n]])
                    rel.append([(inst.locations[n, 0].item() - px) / soi, (inst.locations[n, 1].item() - py) / soi])
            x = torch.cat((torch.tensor(rel).T, x), dim=0)
        params = inst.mask_head_params[n].tolist()
        shapes = head.layer_shapes
        weights, offset = [], 0
        for out_c, in_c in shapes:
            weights.append(torch.tensor(params[offset: offset + out_c * in_c]).reshape(out_c, in_c))
            offset += out_c * in_c
        for layer, (out_c, _) in enumerate(shapes):
            x = weights[layer] @ x + torch.tensor(params[offset: offset + out_c])[:, None]
            offset += out_c
            if layer < len(shapes) - 1:
                x = x.clamp(min=0)
        outputs.append(x.reshape(1, 1, height, width))
    return _loop_aligned_bilinear(torch.cat(outputs), stride // head.mask_out_stride)


def _instances(num, num_params, num_images=2):
    torch.manual_seed(3)
    inst = Instances((0, 0))
    inst.im_inds = torch.randint(0, num_images, (num,))
    inst.locations = torch.rand(num, 2) * 64
    inst.fpn_levels = torch.randint(0, 5, (num,))
    inst.mask_head_params = torch.randn(num, num_params) * 0.5
    return inst


@pytest.mark.parametrize("disable_rel_coords", [False, True])
def test_dynamic_mask_head_grouped_conv_equals_per_instance_loop(disable_rel_coords):
    head = _head(disable_rel_coords)
    assert head.num_params == (153 if disable_rel_coords else 169)
    mask_feats = torch.randn(2, 8, 4, 5)
    inst = _instances(5, head.num_params)
    out = head(mask_feats, 8, inst)
    assert out.shape == (5, 1, 8, 10)
    assert torch.allclose(out, _loop_dynamic_head(head, mask_feats, 8, inst), atol=1e-4)
    assert head(mask_feats, 8, inst[:0]).shape == (0, 1, 8, 10)


def test_mask_loss_is_mean_dice_of_assigned_objects():
    head = _head()
    mask_feats = torch.randn(2, 8, 4, 4)
    inst = _instances(4, head.num_params)
    inst.gt_inds = torch.tensor([0, 2, 2, 1])
    gts = []
    for count in (2, 1):
        gt = Instances((32, 32))
        gt.gt_bitmasks = (torch.rand(count, 8, 8) > 0.5).float()
        gts.append(gt)
    loss = head.loss(mask_feats, 8, inst, gts)["loss_mask"]
    probs = _loop_dynamic_head(head, mask_feats, 8, inst).sigmoid()
    all_targets = torch.cat([g.gt_bitmasks for g in gts])
    expected = 0.0
    for n in range(4):
        p, t = probs[n].flatten().tolist(), all_targets[inst.gt_inds[n]].flatten().tolist()
        inter = sum(a * b for a, b in zip(p, t))
        denom = sum(a * a for a in p) + sum(b * b for b in t)
        expected += 1 - 2 * inter / (denom + 1e-5)
    assert loss.item() == pytest.approx(expected / 4, rel=1e-4)
    # No positive: a zero loss that still reaches the mask features and the parameters.
    empty = inst[:0]
    feats = mask_feats.clone().requires_grad_()
    zero = head.loss(feats, 8, empty, gts)["loss_mask"]
    zero.backward()
    assert zero.item() == 0 and feats.grad is not None


def test_sample_positives_topk_per_image_matches_loop():
    torch.manual_seed(0)
    pos = Instances((0, 0))
    pos.im_inds = torch.tensor([0] * 7 + [1] * 3)
    pos.gt_inds = torch.tensor([0, 0, 0, 0, 1, 1, 1, 2, 2, 2])
    pos.logits_pred = torch.randn(10, 3)
    pos.ctrness_pred = torch.randn(10)
    kept = sample_positives(pos, max_proposals=-1, topk_per_image=4)
    scores = pos.logits_pred.sigmoid().max(dim=1).values * pos.ctrness_pred.sigmoid()
    expected = []
    for image in (0, 1):
        objects = sorted({int(g) for g, i in zip(pos.gt_inds, pos.im_inds) if i == image})
        per_object = max(4 // len(objects), 1)
        for obj in objects:
            members = [k for k in range(10) if pos.im_inds[k] == image and pos.gt_inds[k] == obj]
            members.sort(key=lambda k: -scores[k].item())
            expected += members[:per_object]
    assert sorted(kept.logits_pred.tolist()) == sorted(pos.logits_pred[expected].tolist())
    assert len(sample_positives(pos, max_proposals=6)) == 6
    assert len(sample_positives(pos, max_proposals=50)) == 10
    assert len(sample_positives(pos[:0], topk_per_image=4)) == 0


def test_bitmask_targets_sample_stride_centres():
    inst = Instances((20, 24))
    square = np.array([2, 3, 14, 3, 14, 11, 2, 11], dtype=np.float64)
    inst.gt_masks = PolygonMasks([[square]])
    inst.gt_boxes = Boxes(torch.tensor([[2.0, 3.0, 14.0, 11.0]]))
    add_bitmask_targets(inst, 32, 32, 4)
    full = inst.gt_bitmasks_full
    assert full.shape == (1, 32, 32) and full[0, 20:, :].sum() == 0
    for i in range(8):
        for j in range(8):
            assert inst.gt_bitmasks[0, i, j] == full[0, 4 * i + 2, 4 * j + 2]
    empty = Instances((20, 24))
    empty.gt_masks = PolygonMasks([])
    empty.gt_boxes = Boxes(torch.zeros(0, 4))
    assert add_bitmask_targets(empty, 32, 32, 4).gt_bitmasks.shape == (0, 8, 8)
    no_masks = Instances((20, 24))  # an instance without a mask (an image without any gets empty masks)
    no_masks.gt_boxes = Boxes(torch.tensor([[2.0, 2.0, 9.0, 9.0]]))
    with pytest.raises(ValueError, match="gt_masks"):
        add_bitmask_targets(no_masks, 32, 32, 4)


def test_semantic_targets_match_loop():
    inst = Instances((16, 16))
    masks = torch.zeros(2, 16, 16)
    masks[0, 0:12, 0:12] = 1
    masks[1, 4:8, 4:16] = 1  # smaller: wins where they overlap
    inst.gt_bitmasks_full = masks
    inst.gt_classes = torch.tensor([2, 0])
    targets = semantic_targets([inst], num_classes=3, stride=4)
    for i in range(4):
        for j in range(4):
            y, x = 4 * i + 2, 4 * j + 2
            covering = [(masks[k].sum().item(), int(inst.gt_classes[k])) for k in range(2) if masks[k, y, x]]
            assert targets[0, i, j].item() == (min(covering)[1] if covering else 3)


def test_train_step_with_an_empty_image_and_semantic_loss():
    cfg = tiny_cfg(CONDINST_YAML, SMALL + ["MODEL.CONDINST.MASK_BRANCH.SEMANTIC_LOSS_ON", True])
    model = build_tiny_model(cfg)
    batch = dataset_batch(cfg, indices=(0, 1))
    batch[0]["instances"] = batch[0]["instances"][:0]  # an image without annotations
    losses = train_step(model, batch)
    assert set(losses) == {"loss_fcos_cls", "loss_fcos_loc", "loss_fcos_ctr", "loss_mask", "loss_sem"}
    assert all(math.isfinite(v) and v > 0 for v in losses.values())
    assert model.controller.weight.grad.abs().sum() > 0

    empty_batch = dataset_batch(cfg, indices=(0,))
    empty_batch[0]["instances"] = empty_batch[0]["instances"][:0]
    losses = train_step(model, empty_batch)  # no positive at all
    assert losses["loss_mask"] == 0 and losses["loss_fcos_loc"] == 0 and math.isfinite(losses["loss_fcos_cls"])


def test_inference_full_image_masks_at_original_size():
    cfg = tiny_cfg(CONDINST_YAML, SMALL + ["MODEL.FCOS.INFERENCE_TH_TEST", 0.0])
    inputs, instances = predict(build_tiny_model(cfg), cfg, indices=(0, 1))
    for inp, inst in zip(inputs, instances):
        assert_instance_predictions(inst, inp["height"], inp["width"])


def test_zero_detections():
    cfg = tiny_cfg(CONDINST_YAML, SMALL + ["MODEL.FCOS.INFERENCE_TH_TEST", 1.0])
    (inp,), (inst,) = predict(build_tiny_model(cfg), cfg)
    assert len(inst) == 0 and inst.pred_masks.shape == (0, inp["height"], inp["width"])


def test_bad_config_values_are_clear_errors():
    with pytest.raises(ValueError, match="BOTTOM_PIXELS_REMOVED"):
        build_tiny_model(tiny_cfg(CONDINST_YAML, ["MODEL.CONDINST.BOTTOM_PIXELS_REMOVED", 10]))
    with pytest.raises(ValueError, match="PAIRWISE.SIZE"):
        build_tiny_model(tiny_cfg(CONDINST_YAML, ["MODEL.BOXINST.ENABLED", True, "MODEL.BOXINST.PAIRWISE.SIZE", 2]))
    with pytest.raises(ValueError, match="MASK_BRANCH.IN_FEATURES"):
        build_tiny_model(tiny_cfg(CONDINST_YAML, ["MODEL.CONDINST.MASK_BRANCH.IN_FEATURES", ["p1", "p2"]]))
    with pytest.raises(ValueError, match="NUM_LAYERS"):
        build_tiny_model(tiny_cfg(CONDINST_YAML, ["MODEL.CONDINST.MASK_HEAD.NUM_LAYERS", 0]))


def test_checkpoint_round_trip(tmp_path):
    cfg = tiny_cfg(CONDINST_YAML, SMALL + ["MODEL.FCOS.INFERENCE_TH_TEST", 0.0])
    assert_checkpoint_round_trip(cfg, str(tmp_path), fields=("pred_masks", "scores"))


def test_overfit_losses_fall():
    cfg = tiny_cfg(CONDINST_YAML, SMALL)
    # 30 steps at lr 0.01: with FCOS on P2-P6 (the quick-start levels) 20 steps at lr 0.02 get the total loss to
    # only 0.57x (a spike of the centerness loss on the way).
    history = loss_history(build_tiny_model(cfg), dataset_batch(cfg, indices=(0, 1)), iterations=30, lr=0.01)
    assert_losses_fall(history, 0.5, loss_mask=0.8)
