"""FCOS pieces against loop references, and the model end to end on the built-in dataset (CPU)."""
import math

import pytest
import torch
from detectron2.layers import ShapeSpec, batched_nms
from detectron2.structures import Boxes, Instances

from adet_lite.fcos import inference as fcos_inference
from adet_lite.fcos.head import top_feats_at_locations, top_feats_conv
from adet_lite.fcos.inference import fcos_inference_single_image, nms_of_highest
from adet_lite.fcos.losses import fcos_losses
from adet_lite.fcos.targets import (
    centerness_targets, compute_locations, fcos_targets_single_image, level_size_ranges)
from d2ext.testing import (
    assert_checkpoint_round_trip, box_iou_reference, build_tiny_model, config_path, dataset_batch, overfit, predict,
    tiny_cfg, train_step)


FCOS_YAML = config_path("quickstart/fcos_R18_synthetic.yaml")
# Test-sized on top of the quick-start config: ~100 px inputs, one conv per tower.
SMALL_INPUT = ["INPUT.MIN_SIZE_TEST", 96, "INPUT.MAX_SIZE_TEST", 144,
               "MODEL.FCOS.NUM_CLS_CONVS", 1, "MODEL.FCOS.NUM_BOX_CONVS", 1]


def test_compute_locations_matches_loop():
    locations = compute_locations(3, 5, 16, "cpu")
    expected = [(j * 16 + 8, i * 16 + 8) for i in range(3) for j in range(5)]
    assert locations.tolist() == [[float(x), float(y)] for x, y in expected]


def _instances(boxes, classes, masks=None):
    inst = Instances((128, 128))
    inst.gt_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4))
    inst.gt_classes = torch.tensor(classes, dtype=torch.int64)
    if masks is not None:
        inst.gt_bitmasks_full = masks
    return inst


def _loop_targets(points, strides, ranges, boxes, classes, centers, num_classes, radius, center_sample):
    """Reference assignment, one location and one box at a time."""
    labels, targets, inds = [], [], []
    for (x, y), stride, (low, high) in zip(points, strides, ranges):
        best, best_area = -1, math.inf
        for k, (x0, y0, x1, y1) in enumerate(boxes):
            l, t, r, b = x - x0, y - y0, x1 - x, y1 - y
            if center_sample:
                cx, cy = centers[k]
                rx0, ry0 = max(cx - radius * stride, x0), max(cy - radius * stride, y0)
                rx1, ry1 = min(cx + radius * stride, x1), min(cy + radius * stride, y1)
                inside = min(x - rx0, y - ry0, rx1 - x, ry1 - y) > 0
            else:
                inside = min(l, t, r, b) > 0
            in_range = low <= max(l, t, r, b) <= high
            area = (x1 - x0) * (y1 - y0)
            if inside and in_range and area < best_area:
                best, best_area = k, area
        if best < 0:
            labels.append(num_classes), targets.append([0.0] * 4), inds.append(-1)
        else:
            x0, y0, x1, y1 = boxes[best]
            labels.append(classes[best]), targets.append([x - x0, y - y0, x1 - x, y1 - y]), inds.append(best)
    return labels, targets, inds


def _all_levels(image_size=128, strides=(8, 16, 32), sizes=(16, 48)):
    points, point_strides, ranges = [], [], []
    for stride, rng in zip(strides, level_size_ranges(list(sizes), len(strides))):
        loc = compute_locations(image_size // stride, image_size // stride, stride, "cpu")
        points.append(loc)
        point_strides += [float(stride)] * len(loc)
        ranges += [rng] * len(loc)
    return torch.cat(points), torch.tensor(point_strides), torch.tensor(ranges)


@pytest.mark.parametrize("center_sample", [True, False])
def test_targets_match_loop_reference(center_sample):
    # A big box containing a small one (minimum-area rule), a box crossing level ranges, a thin box.
    boxes = [[10, 10, 110, 100], [30, 30, 50, 46], [60, 5, 90, 120], [0, 78, 128, 84]]
    classes = [0, 1, 2, 3]
    points, strides, ranges = _all_levels()
    inst = _instances(boxes, classes)
    labels, reg, inds = fcos_targets_single_image(points, strides, ranges, inst, 4, center_sample, 1.5)
    centers = [((b[0] + b[2]) / 2, (b[1] + b[3]) / 2) for b in boxes]
    ref = _loop_targets(points.tolist(), strides.tolist(), ranges.tolist(), boxes, classes, centers, 4, 1.5,
                        center_sample)
    assert labels.tolist() == ref[0]
    assert torch.allclose(reg, torch.tensor(ref[1]))
    assert inds.tolist() == ref[2]
    assert set(inds.tolist()) == {-1, 0, 1, 2, 3}  # every object gets positives


def test_minimum_area_object_wins():
    # Stride-16 location (40, 40) is in the level range of both boxes; the smaller one wins.
    points, strides, ranges = _all_levels()
    inst = _instances([[20, 20, 60, 60], [28, 28, 60, 56]], [0, 1])
    labels, reg, inds = fcos_targets_single_image(points, strides, ranges, inst, 4, True, 1.5)
    at = ((points == torch.tensor([40.0, 40.0])).all(dim=1) & (strides == 16)).nonzero().item()
    assert inds[at].item() == 1 and labels[at].item() == 1
    assert reg[at].tolist() == [12.0, 12.0, 20.0, 16.0]


def test_center_sampling_uses_mask_centroid():
    # An L-shaped mask whose centroid is far from the box centre.
    masks = torch.zeros(1, 128, 128)
    masks[0, 16:112, 16:40] = 1
    masks[0, 88:112, 16:112] = 1
    box = [16, 16, 112, 112]
    points, strides, ranges = _all_levels(sizes=(16, 48))
    inst = _instances([box], [2], masks)
    radius = 0.5  # small enough for the centre to matter on this coarse level
    labels, _, inds = fcos_targets_single_image(points, strides, ranges, inst, 4, True, radius)
    ys, xs = torch.nonzero(masks[0], as_tuple=True)
    centroid = (xs.float().mean().item(), ys.float().mean().item())
    ref = _loop_targets(points.tolist(), strides.tolist(), ranges.tolist(), [box], [2], [centroid], 4, radius, True)
    assert labels.tolist() == ref[0] and inds.tolist() == ref[2]
    box_center_ref = _loop_targets(points.tolist(), strides.tolist(), ranges.tolist(), [box], [2], [(64, 64)],
                                   4, radius, True)
    assert inds.tolist() != box_center_ref[2]  # the centroid really moved the positives


def test_targets_empty_image_and_degenerate_box():
    points, strides, ranges = _all_levels()
    labels, reg, inds = fcos_targets_single_image(points, strides, ranges, _instances([], []), 4)
    assert (labels == 4).all() and (reg == 0).all() and (inds == -1).all()
    # A zero-width box has no location strictly inside it: no positives, no error.
    labels, _, inds = fcos_targets_single_image(points, strides, ranges, _instances([[20, 20, 20, 60]], [1]), 4)
    assert (labels == 4).all() and (inds == -1).all()


def test_level_size_ranges_errors_on_wrong_length():
    assert level_size_ranges([64, 128], 3) == [(-1.0, 64.0), (64.0, 128.0), (128.0, math.inf)]
    with pytest.raises(ValueError, match="SIZES_OF_INTEREST"):
        level_size_ranges([64, 128], 5)


def test_losses_match_loop_reference():
    torch.manual_seed(0)
    num_classes = 3
    logits = torch.randn(6, num_classes)
    box_reg = torch.rand(6, 4) * 3 + 0.1
    quality = torch.randn(6)
    labels = torch.tensor([3, 0, 2, 3, 1, 3])
    reg_targets = torch.rand(6, 4) * 3 + 0.1
    out = fcos_losses(logits, box_reg, quality, labels, reg_targets, cls_normalizer=3.0, num_pos_avg=3.0)

    focal = 0.0
    for i in range(6):
        for c in range(num_classes):
            p = torch.sigmoid(logits[i, c]).item()
            target = 1.0 if labels[i] == c else 0.0
            p_t = p if target else 1 - p
            alpha_t = 0.25 if target else 0.75
            focal += -alpha_t * (1 - p_t) ** 2 * math.log(p_t)
    assert out["loss_fcos_cls"].item() == pytest.approx(focal / 3.0, rel=1e-5)

    weighted, ctr_sum, bce = 0.0, 0.0, 0.0
    for i in [1, 2, 4]:
        l, t, r, b = reg_targets[i].tolist()
        ctr = math.sqrt(min(l, r) / max(l, r) * min(t, b) / max(t, b))
        pl, pt, pr, pb = box_reg[i].tolist()
        pred_box, tgt_box = (-pl, -pt, pr, pb), (-l, -t, r, b)
        iw = min(pred_box[2], tgt_box[2]) - max(pred_box[0], tgt_box[0])
        ih = min(pred_box[3], tgt_box[3]) - max(pred_box[1], tgt_box[1])
        inter = max(iw, 0) * max(ih, 0)
        union = (pl + pr) * (pt + pb) + (l + r) * (t + b) - inter
        hull = (max(pr, r) + max(pl, l)) * (max(pb, b) + max(pt, t))
        giou = inter / union - (hull - union) / hull
        weighted += (1 - giou) * ctr
        ctr_sum += ctr
        q = torch.sigmoid(quality[i]).item()
        bce += -(ctr * math.log(q) + (1 - ctr) * math.log(1 - q))
    assert out["loss_fcos_loc"].item() == pytest.approx(weighted / ctr_sum, rel=1e-5)
    assert out["loss_fcos_ctr"].item() == pytest.approx(bce / 3.0, rel=1e-5)


def test_losses_without_positives_are_zero_and_differentiable():
    logits = torch.randn(5, 2, requires_grad=True)
    box_reg = torch.rand(5, 4, requires_grad=True)
    quality = torch.randn(5, requires_grad=True)
    out = fcos_losses(logits, box_reg, quality, torch.full((5,), 2), torch.zeros(5, 4),
                      cls_normalizer=1.0, num_pos_avg=1.0)
    assert out["loss_fcos_loc"].item() == 0 and out["loss_fcos_ctr"].item() == 0
    sum(out.values()).backward()
    assert box_reg.grad is not None and quality.grad is not None


def test_centerness_targets_match_formula():
    reg = torch.tensor([[1.0, 2.0, 3.0, 4.0], [2.0, 2.0, 2.0, 2.0]])
    assert centerness_targets(reg).tolist() == pytest.approx([math.sqrt(1 / 3 * 2 / 4), 1.0])


@pytest.mark.parametrize("thresh_with_ctr", [False, True])
def test_inference_matches_loop_reference(thresh_with_ctr):
    torch.manual_seed(1)
    strides = [8, 16]
    locations = [compute_locations(4, 4, 8, "cpu"), compute_locations(2, 2, 16, "cpu")]
    logits = [torch.randn(16, 3) + 1, torch.randn(4, 3) + 1]
    box_reg = [torch.rand(16, 4) + 2, torch.rand(4, 4) + 1]  # large boxes: neighbours overlap, NMS suppresses
    quality = [torch.randn(16), torch.randn(4)]
    result = fcos_inference_single_image(logits, box_reg, quality, locations, strides, (32, 32),
                                         score_thresh=0.3, topk_candidates=5, nms_thresh=0.6, max_detections=6,
                                         thresh_with_ctr=thresh_with_ctr)

    candidates = []  # (score, box, class, level)
    for level, stride in enumerate(strides):
        level_candidates = []
        for i in range(len(locations[level])):
            ctr = torch.sigmoid(quality[level][i]).item()
            for c in range(3):
                cls = torch.sigmoid(logits[level][i, c]).item()
                gate = cls * ctr if thresh_with_ctr else cls
                if gate > 0.3:
                    x, y = locations[level][i].tolist()
                    l, t, r, b = (box_reg[level][i] * stride).tolist()
                    level_candidates.append((math.sqrt(cls * ctr), [x - l, y - t, x + r, y + b], c, level))
        level_candidates.sort(key=lambda item: -item[0])
        candidates += level_candidates[:5]
    survivors = _greedy_nms_loop([item[1] for item in candidates], [item[0] for item in candidates],
                                 [item[2] for item in candidates], 0.6)
    assert 6 < len(survivors) < len(candidates)  # NMS suppresses some candidates and the cap some survivors
    kept = [candidates[i] for i in survivors[:6]]
    assert result.scores.tolist() == pytest.approx([item[0] for item in kept], rel=1e-5)
    assert torch.allclose(result.pred_boxes.tensor, torch.tensor([item[1] for item in kept]), atol=1e-4)
    assert result.pred_classes.tolist() == [item[2] for item in kept]
    assert result.fpn_levels.tolist() == [item[3] for item in kept]


@pytest.mark.parametrize("cap", [0, -1])
def test_inference_cap_of_zero_or_less_keeps_every_detection(cap):
    """AdelaiDet's ``POST_NMS_TOPK_*`` <= 0 means no per-image cap: all of NMS's survivors, as with a cap above
    their number."""
    torch.manual_seed(2)
    locations = [compute_locations(8, 8, 8, "cpu")]
    logits, box_reg, quality = [torch.randn(64, 3) + 1], [torch.rand(64, 4) * 2], [torch.randn(64)]

    def detect(max_detections):
        return fcos_inference_single_image(logits, box_reg, quality, locations, [8], (64, 64), score_thresh=0.05,
                                           topk_candidates=1000, nms_thresh=0.6, max_detections=max_detections,
                                           thresh_with_ctr=False)

    uncapped, capped = detect(cap), detect(1000)
    assert len(capped) > 5
    assert uncapped.scores.tolist() == capped.scores.tolist()
    assert len(detect(5)) == 5


def _greedy_nms_loop(boxes, scores, classes, iou_threshold):
    """Class-aware greedy NMS, one box at a time: survivors by decreasing score."""
    kept = []
    for i in sorted(range(len(scores)), key=lambda i: -scores[i]):
        if all(classes[k] != classes[i] or box_iou_reference(boxes[k], boxes[i]) <= iou_threshold for k in kept):
            kept.append(i)
    return kept


@pytest.mark.parametrize("duplicated_top", [False, True])
def test_nms_of_highest_keeps_the_top_survivors_of_nms_over_all(duplicated_top, monkeypatch):
    """NMS over the highest-scoring candidates first gives the top survivors of greedy NMS over all of them;
    when the highest-scoring candidates suppress each other (``duplicated_top``: the 40 best are copies
    of one box), too few survive there and NMS must run over all of them."""
    torch.manual_seed(3)
    corners = torch.rand(300, 2) * 200
    boxes = torch.cat([corners, corners + 10 + torch.rand(300, 2) * 60], dim=1)
    scores = torch.rand(300)
    classes = torch.randint(0, 3, (300,))
    if duplicated_top:
        top = scores.topk(40).indices
        boxes[top], classes[top] = boxes[top[0]].clone(), classes[top[0]].clone()
    expected = _greedy_nms_loop(boxes.tolist(), scores.tolist(), classes.tolist(), 0.5)[:20]
    assert len(expected) == 20
    nms_sizes = []

    def recording_nms(boxes, *args):
        nms_sizes.append(len(boxes))
        return batched_nms(boxes, *args)

    monkeypatch.setattr(fcos_inference, "batched_nms", recording_nms)
    keep = nms_of_highest(boxes, scores, classes, 0.5, max_detections=20, first=50)
    assert keep[:20].tolist() == expected
    assert nms_sizes == ([50, 300] if duplicated_top else [50])
    assert scores[keep].tolist() == sorted(scores[keep].tolist(), reverse=True)


def test_yaml_builds_and_head_exposes_box_towers():
    cfg = tiny_cfg(FCOS_YAML, SMALL_INPUT)
    model = build_tiny_model(cfg)
    assert type(model).__name__ == "OneStageDetector"
    features = model.backbone(torch.randn(1, 3, 128, 160))
    assert set(features) == {"p3", "p4", "p5", "p6", "p7"}
    predictions = model.proposal_generator.predict(features)
    towers = predictions["box_towers"]
    assert [t.shape[-2:] for t in towers] == [features[f].shape[-2:] for f in ["p3", "p4", "p5", "p6", "p7"]]
    assert all(t.shape[1] == cfg.MODEL.FPN.OUT_CHANNELS for t in towers)


def test_top_feats_at_locations_match_a_per_location_loop():
    """The top conv at a few locations of two images (corners and edges included) == a loop over its 3x3
    window."""
    torch.manual_seed(0)
    conv = top_feats_conv({"p3": ShapeSpec(channels=5, stride=8), "p4": ShapeSpec(channels=5, stride=16)}, 7)
    torch.nn.init.normal_(conv.bias)
    towers = [torch.randn(2, 5, 6, 9), torch.randn(2, 5, 3, 5)]
    strides = [8, 16]
    # (image, level, row, col)
    cells = [(0, 0, 0, 0), (1, 0, 5, 8), (0, 0, 2, 4), (1, 1, 0, 4), (0, 1, 2, 0), (1, 1, 1, 2), (1, 0, 5, 0)]
    images = torch.tensor([c[0] for c in cells])
    levels = torch.tensor([c[1] for c in cells])
    locations = torch.tensor([[c[3] * strides[c[1]] + strides[c[1]] // 2, c[2] * strides[c[1]] + strides[c[1]] // 2]
                              for c in cells], dtype=torch.float32)
    with torch.no_grad():
        got = top_feats_at_locations(conv, towers, images, levels, locations, strides)
    for i, (image, level, row, col) in enumerate(cells):
        tower = towers[level][image]
        for k in range(7):
            total = conv.bias[k].item()
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    y, x = row + dy, col + dx
                    if 0 <= y < tower.shape[1] and 0 <= x < tower.shape[2]:
                        total += (conv.weight[k, :, dy + 1, dx + 1] * tower[:, y, x]).sum().item()
            assert float(got[i, k]) == pytest.approx(total, abs=1e-5)
    assert top_feats_at_locations(conv, towers, images[:0], levels[:0], locations[:0], strides).shape == (0, 7)


def test_training_runs_the_top_conv_at_the_positives_only():
    """In training the positives' top features and the gradients they send back equal the dense conv's."""
    cfg = tiny_cfg(FCOS_YAML, SMALL_INPUT)
    model = build_tiny_model(cfg).train()
    conv = top_feats_conv(model.backbone.output_shape(), 11)
    torch.nn.init.normal_(conv.weight)
    fcos = model.proposal_generator
    gt = [Instances((96, 128), gt_boxes=Boxes(torch.tensor([[10.0, 12.0, 70.0, 80.0], [50.0, 8.0, 120.0, 60.0]])),
                    gt_classes=torch.tensor([1, 2])),
          Instances((96, 128), gt_boxes=Boxes(torch.tensor([[30.0, 20.0, 90.0, 90.0]])), gt_classes=torch.tensor([0]))]
    features = model.backbone(torch.randn(2, 3, 96, 128))
    sparse = fcos.predict(features, conv)
    assert sparse["top_feats"] is None
    _, sparse_positives = fcos.losses(sparse, gt)
    dense = fcos.predict(features, lambda tower: conv(tower))  # not a conv module: computed everywhere
    _, dense_positives = fcos.losses(dense, gt)
    assert len(sparse_positives) > 0 and set(sparse_positives.im_inds.tolist()) == {0, 1}
    assert torch.allclose(sparse_positives.top_feats, dense_positives.top_feats, atol=1e-4)
    weights = torch.randn_like(dense_positives.top_feats)
    sparse_grad = torch.autograd.grad((sparse_positives.top_feats * weights).sum(), conv.weight, retain_graph=True)[0]
    dense_grad = torch.autograd.grad((dense_positives.top_feats * weights).sum(), conv.weight)[0]
    assert torch.allclose(sparse_grad, dense_grad, rtol=1e-4, atol=1e-4)


def test_inference_runs_the_top_conv_at_the_detections_only():
    """At inference the top module's features of the detections equal the dense conv's, read at them."""
    cfg = tiny_cfg(FCOS_YAML, SMALL_INPUT + ["MODEL.FCOS.INFERENCE_TH_TEST", 0.0])
    model = build_tiny_model(cfg).eval()
    conv = top_feats_conv(model.backbone.output_shape(), 11)
    torch.nn.init.normal_(conv.weight)
    fcos = model.proposal_generator
    with torch.no_grad():
        features = model.backbone(torch.randn(2, 3, 96, 128))
        predictions = fcos.predict(features, conv)
        assert predictions["top_feats"] is None
        results = fcos.inference(predictions, [(96, 128), (90, 120)])
        dense = fcos.predict(features, lambda tower: conv(tower))  # not a conv module: computed everywhere
        dense_results = fcos.inference(dense, [(96, 128), (90, 120)])
    for sparse, full in zip(results, dense_results):
        assert len(sparse) > 0 and torch.equal(sparse.locations, full.locations)
        assert torch.allclose(sparse.top_feat, full.top_feat, atol=1e-4)


def test_bad_config_values_are_clear_errors():
    with pytest.raises(ValueError, match="LOC_LOSS_TYPE"):
        build_tiny_model(tiny_cfg(FCOS_YAML, ["MODEL.FCOS.LOC_LOSS_TYPE", "smooth_l1"]))
    with pytest.raises(ValueError, match="IN_FEATURES"):
        build_tiny_model(tiny_cfg(FCOS_YAML, ["MODEL.FCOS.IN_FEATURES", ["p2", "p3"], "MODEL.FCOS.FPN_STRIDES",
                                              [4, 8], "MODEL.FCOS.SIZES_OF_INTEREST", [64]]))
    with pytest.raises(ValueError, match="USE_DEFORMABLE"):
        build_tiny_model(tiny_cfg(FCOS_YAML, ["MODEL.FCOS.USE_DEFORMABLE", True]))


def test_train_step_with_an_empty_image_and_inference():
    cfg = tiny_cfg(FCOS_YAML, SMALL_INPUT + ["MODEL.FCOS.INFERENCE_TH_TEST", 0.0])
    model = build_tiny_model(cfg)
    batch = dataset_batch(cfg, indices=(0, 1))
    batch[1]["instances"] = batch[1]["instances"][:0]  # an image without annotations
    losses = train_step(model, batch)
    assert set(losses) == {"loss_fcos_cls", "loss_fcos_loc", "loss_fcos_ctr"}
    assert all(math.isfinite(v) and v > 0 for v in losses.values())
    assert all(p.grad is not None for p in model.proposal_generator.parameters())

    inputs, instances = predict(model, cfg, indices=(0, 1))
    for inp, inst in zip(inputs, instances):
        assert len(inst) > 0 and inst.has("pred_boxes") and inst.has("scores") and inst.has("pred_classes")
        assert inst.pred_boxes.tensor[:, 2].max() <= inp["width"]
        assert len(inst) <= cfg.MODEL.FCOS.POST_NMS_TOPK_TEST


def test_zero_detections():
    cfg = tiny_cfg(FCOS_YAML, SMALL_INPUT + ["MODEL.FCOS.INFERENCE_TH_TEST", 1.0])
    _, (inst,) = predict(build_tiny_model(cfg), cfg)
    assert len(inst) == 0 and inst.pred_boxes.tensor.shape == (0, 4)


def test_checkpoint_round_trip(tmp_path):
    cfg = tiny_cfg(FCOS_YAML, SMALL_INPUT + ["MODEL.FCOS.INFERENCE_TH_TEST", 0.0])
    assert_checkpoint_round_trip(cfg, str(tmp_path), fields=("pred_boxes", "scores"))


def test_overfit_loss_falls():
    cfg = tiny_cfg(FCOS_YAML, SMALL_INPUT)
    model = build_tiny_model(cfg)
    history = overfit(model, dataset_batch(cfg, indices=(0, 1)), iterations=20, lr=0.02)
    assert history[-1] < 0.5 * history[0], history
