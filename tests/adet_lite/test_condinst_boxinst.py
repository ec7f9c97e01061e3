"""BoxInst (CondInst from boxes only): its pieces against loop references, and a CPU train step."""
import math

import pytest
import torch
from detectron2.structures import Boxes, Instances

from adet_lite.condinst.boxinst import (
    add_box_bitmask_targets, color_similarity, pairwise_disagreement, projection_loss, rgb_to_lab,
    unfold_without_center)
from d2ext.testing import build_tiny_model, config_path, dataset_batch, tiny_cfg, train_step


BOXINST_YAML = config_path("quickstart/boxinst_R18_synthetic.yaml")
SMALL = ["INPUT.MIN_SIZE_TEST", 96, "INPUT.MAX_SIZE_TEST", 144, "MODEL.FCOS.NUM_CLS_CONVS", 1,
         "MODEL.FCOS.NUM_BOX_CONVS", 1, "MODEL.CONDINST.MASK_BRANCH.NUM_CONVS", 2]


def test_rgb_to_lab_known_colours():
    colours = torch.tensor([[255.0, 255.0, 255.0], [0.0, 0.0, 0.0], [255.0, 0.0, 0.0], [0.0, 0.0, 255.0]])
    lab = rgb_to_lab(colours.T[None, :, :, None])[0, :, :, 0].T
    expected = [[100.0, 0.0, 0.0], [0.0, 0.0, 0.0], [53.24, 80.09, 67.20], [32.30, 79.19, -107.86]]
    for got, want in zip(lab.tolist(), expected):
        assert got == pytest.approx(want, abs=0.05)


def _neighbour_offsets(kernel_size, dilation):
    half = kernel_size // 2
    return [(dy * dilation, dx * dilation) for dy in range(-half, half + 1) for dx in range(-half, half + 1)
            if (dy, dx) != (0, 0)]


def test_unfold_without_center_matches_loop():
    x = torch.randn(1, 2, 5, 6)
    unfolded = unfold_without_center(x, 3, 2)
    for k, (dy, dx) in enumerate(_neighbour_offsets(3, 2)):
        for i in range(5):
            for j in range(6):
                inside = 0 <= i + dy < 5 and 0 <= j + dx < 6
                for c in range(2):
                    want = x[0, c, i + dy, j + dx].item() if inside else 0.0
                    assert unfolded[0, c, k, i, j].item() == pytest.approx(want)


def test_color_similarity_matches_loop():
    lab = torch.rand(3, 4, 5) * 50
    valid = torch.ones(4, 5)
    valid[3] = 0
    sim = color_similarity(lab, valid, 3, 1)
    for k, (dy, dx) in enumerate(_neighbour_offsets(3, 1)):
        for i in range(4):
            for j in range(5):
                ni, nj = i + dy, j + dx
                if 0 <= ni < 4 and 0 <= nj < 5 and valid[ni, nj]:
                    want = math.exp(-0.5 * torch.norm(lab[:, i, j] - lab[:, ni, nj]).item())
                else:
                    want = 0.0
                assert sim[k, i, j].item() == pytest.approx(want, rel=1e-5, abs=1e-7)


def test_pairwise_disagreement_matches_loop():
    logits = torch.randn(2, 1, 4, 5)
    out = pairwise_disagreement(logits, 3, 2)
    p = logits.sigmoid()
    for n in range(2):
        for k, (dy, dx) in enumerate(_neighbour_offsets(3, 2)):
            for i in range(4):
                for j in range(5):
                    ni, nj = i + dy, j + dx
                    if 0 <= ni < 4 and 0 <= nj < 5:
                        a, b = p[n, 0, i, j].item(), p[n, 0, ni, nj].item()
                        want = -math.log(a * b + (1 - a) * (1 - b))
                    else:
                        want = 0.0  # no neighbour (and zero weight in the loss)
                    assert out[n, k, i, j].item() == pytest.approx(want, rel=1e-4, abs=1e-6)


def test_projection_loss_matches_loop():
    probs = torch.rand(2, 1, 4, 6)
    boxes = torch.zeros(2, 1, 4, 6)
    boxes[0, 0, 1:3, 2:5] = 1
    boxes[1, 0, 0:4, 0:2] = 1

    def dice(p, t):
        return 1 - 2 * sum(a * b for a, b in zip(p, t)) / (sum(a * a for a in p) + sum(b * b for b in t) + 1e-5)

    total = 0.0
    for n in range(2):
        px = [max(probs[n, 0, i, j].item() for i in range(4)) for j in range(6)]
        tx = [max(boxes[n, 0, i, j].item() for i in range(4)) for j in range(6)]
        py = [max(probs[n, 0, i, j].item() for j in range(6)) for i in range(4)]
        ty = [max(boxes[n, 0, i, j].item() for j in range(6)) for i in range(4)]
        total += dice(px, tx) + dice(py, ty)
    assert projection_loss(probs, boxes).item() == pytest.approx(total / 2, rel=1e-5)


def test_box_bitmask_targets_match_loop():
    inst = Instances((20, 20))
    inst.gt_boxes = Boxes(torch.tensor([[2.5, 3.0, 9.7, 12.2], [0.0, 0.0, 0.0, 0.0]]))
    add_box_bitmask_targets(inst, 24, 28, 4)
    for n, (x0, y0, x1, y1) in enumerate(inst.gt_boxes.tensor.tolist()):
        for y in range(24):
            for x in range(28):
                inside = math.floor(x0) <= x <= math.floor(x1) and math.floor(y0) <= y <= math.floor(y1)
                assert inst.gt_bitmasks_full[n, y, x].item() == float(inside)
    assert torch.equal(inst.gt_bitmasks, inst.gt_bitmasks_full[:, 2::4, 2::4])


def test_train_step_from_boxes_with_an_empty_image_and_warmup():
    cfg = tiny_cfg(BOXINST_YAML, SMALL + ["MODEL.BOXINST.PAIRWISE.WARMUP_ITERS", 1])
    model = build_tiny_model(cfg)
    batch = dataset_batch(cfg, indices=(0, 1))
    assert not batch[0]["instances"].has("gt_masks")  # boxes only
    batch[1]["instances"] = batch[1]["instances"][:0]
    losses = train_step(model, batch)
    assert set(losses) == {"loss_fcos_cls", "loss_fcos_loc", "loss_fcos_ctr", "loss_prj", "loss_pairwise"}
    assert all(math.isfinite(v) and v > 0 for v in losses.values())

    # At iteration 0 with a 4-iteration warm-up the pairwise loss is a quarter of the full one.
    warm = build_tiny_model(tiny_cfg(BOXINST_YAML, SMALL + ["MODEL.BOXINST.PAIRWISE.WARMUP_ITERS", 4]))
    torch.manual_seed(0)
    full = train_step(build_tiny_model(cfg), batch)["loss_pairwise"]
    torch.manual_seed(0)
    quarter = train_step(warm, batch)["loss_pairwise"]
    assert quarter == pytest.approx(full / 4, rel=1e-4)
    # WARMUP_ITERS 0: no warm-up, the full loss from the first iteration (it divided by zero).
    torch.manual_seed(0)
    no_warmup = train_step(build_tiny_model(tiny_cfg(BOXINST_YAML, SMALL + ["MODEL.BOXINST.PAIRWISE.WARMUP_ITERS", 0])),
                           batch)["loss_pairwise"]
    assert no_warmup == pytest.approx(full, rel=1e-4)

    model.eval()
    inp = dataset_batch(cfg, is_train=False, indices=(0,))
    with torch.no_grad():
        inst = model(inp)[0]["instances"]
    assert inst.pred_masks.shape[1:] == (inp[0]["height"], inp[0]["width"])
