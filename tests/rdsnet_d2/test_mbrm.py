"""MBRM against a loop-based reference of the official algorithm (index space) plus our documented
pixel convention (left/top edge = official index + 1, right/bottom edge = official index)."""
import math

import pytest
import torch

from rdsnet_d2 import MBRM
from rdsnet_d2.mbrm import OFFICIAL_BIAS, OFFICIAL_KERNEL


def _sigmoid(v):
    return 1.0 / (1.0 + math.exp(-v))


def _response(profile, column, kernel, bias):
    """Official 1-D conv (cross-correlation, zero padding) evaluated at one column."""
    half = len(kernel) // 2
    total = bias
    for k, w in enumerate(kernel):
        c = column + k - half
        if 0 <= c < len(profile):
            total += w * profile[c]
    return total


def _prior(position, centre, size, gamma=0.05, cutoff=0.0044):
    sigma = max(gamma * size, 1.0)
    density = math.exp(-0.5 * ((position - centre) / sigma) ** 2) / (math.sqrt(2 * math.pi) * sigma)
    return density if density > cutoff else 0.0


def _reference_axis(profile, lo, hi, kernel=OFFICIAL_KERNEL, bias=OFFICIAL_BIAS):
    """Left/top and right/bottom edges by explicit loops over positions 0..L (first maximum)."""
    length = len(profile)
    flipped = list(reversed(kernel))
    results = []
    for centre, side in ((lo, "low"), (hi, "high")):
        best, best_pos = 0.0, None
        for e in range(length + 1):
            if side == "low":
                lik = _sigmoid(_response(profile, e - 1, kernel, bias))
            else:
                lik = _sigmoid(_response(profile, e, flipped, bias))
            post = lik * _prior(e, centre, hi - lo)
            if post > best:
                best, best_pos = post, e
        results.append(float(best_pos) if best_pos is not None else centre)
    return results


def _reference(mask, box, kernel=OFFICIAL_KERNEL, bias=OFFICIAL_BIAS):
    rows = mask.tolist()
    x_profile = [max(r[c] for r in rows) for c in range(len(rows[0]))]
    y_profile = [max(r) for r in rows]
    x1, x2 = _reference_axis(x_profile, box[0], box[2], kernel, bias)
    y1, y2 = _reference_axis(y_profile, box[1], box[3], kernel, bias)
    return [x1, y1, x2, y2]


def _step_mask(height, width, x_range, y_range, value=1.0):
    mask = torch.zeros(height, width)
    mask[y_range[0]: y_range[1] + 1, x_range[0]: x_range[1] + 1] = value
    return mask


def test_official_constants():
    mbrm = MBRM()
    assert mbrm.weight.shape == (1, 1, 9) and mbrm.bias.shape == (1,)
    # The released values, written out (shared/reference/rdsnet_solo.md), not read from the module.
    released = torch.tensor([-0.2968, -0.2892, -0.2635, -3.2545, -0.1874, 2.5041, 0.0196, 0.0651, 0.0917])
    assert torch.equal(mbrm.weight.flatten(), released)
    assert mbrm.bias.item() == pytest.approx(-1.9536)
    assert (mbrm.kernel_half_size, mbrm.gamma, mbrm.prior_cutoff) == (4, 0.05, 0.0044)


def test_step_mask_pixel_convention():
    """Mask over columns 15..44: the official code returns pixel indices l = 14, r = 45; our continuous
    edges are (l + 1, r) = (15, 45), i.e. exactly the mask's extent."""
    mask = _step_mask(40, 60, (15, 44), (10, 29))
    # The official index-space answer, computed by loops (argmax over columns 0..W-1, 'same' padding).
    x_profile = mask.amax(dim=0).tolist()
    left = [_sigmoid(_response(x_profile, c, OFFICIAL_KERNEL, OFFICIAL_BIAS)) for c in range(60)]
    right = [_sigmoid(_response(x_profile, c, OFFICIAL_KERNEL[::-1], OFFICIAL_BIAS)) for c in range(60)]
    assert left.index(max(left)) == 14 and right.index(max(right)) == 45
    refined = MBRM()(mask[None], torch.tensor([[15.0, 10.0, 45.0, 30.0]]))
    assert refined.tolist() == [[15.0, 10.0, 45.0, 30.0]]


@pytest.mark.parametrize("shift", [-2, -1, 1, 2])
def test_recovers_mask_edges_from_shifted_boxes(shift):
    mask = _step_mask(40, 60, (15, 44), (10, 29))
    box = [15.0 + shift, 10.0 - shift, 45.0 + shift, 30.0 - shift]
    refined = MBRM()(mask[None], torch.tensor([box]))
    assert refined.tolist() == [_reference(mask, box)]
    truth = torch.tensor([[15.0, 10.0, 45.0, 30.0]])
    error, regressed_error = (refined - truth).abs()[0], (torch.tensor([box]) - truth).abs()[0]
    assert (error <= regressed_error).all() and error.sum() < regressed_error.sum()
    # Sides one pixel outside the mask (x1, y1 too small or x2, y2 too large) are put on its edge.
    outward = [box[0] < 15, box[1] < 10, box[2] > 45, box[3] > 30]
    if abs(shift) == 1:
        assert all(error[i] == 0 for i in range(4) if outward[i])


def test_uninformative_mask_keeps_box():
    box = [12.0, 7.0, 33.0, 25.0]
    for value in (0.0, 1.0):
        refined = MBRM()(torch.full((1, 32, 48), value), torch.tensor([box]))
        assert refined.tolist() == [box] == [_reference(torch.full((32, 48), value), box)]


# An ideal step detector (background at the scored column, object next to it): likelihood ~1 on
# the edge and ~2e-9 elsewhere, so the prior alone decides which edges are within reach.
STEP_KERNEL = (0.0, 0.0, 0.0, 0.0, -40.0, 40.0, 0.0, 0.0, 0.0)
STEP_BIAS = -20.0


def _sharp_mbrm():
    mbrm = MBRM()
    with torch.no_grad():
        mbrm.weight.copy_(torch.tensor(STEP_KERNEL).view(1, 1, -1))
        mbrm.bias.fill_(STEP_BIAS)
    return mbrm


def _sharp_reference(mask, box):
    return _reference(mask, box, STEP_KERNEL, STEP_BIAS)


def test_sigma_floor_lets_small_boxes_move():
    """Box width 4: sigma = gamma * 4 = 0.2 px would pin the side; the floor sigma = 1 lets it move 2 px."""
    mask = _step_mask(30, 30, (10, 15), (10, 15))  # edges x1 = 10, x2 = 16
    box = [12.0, 10.0, 16.0, 16.0]
    refined = _sharp_mbrm()(mask[None], torch.tensor([box]))
    assert refined.tolist() == [[10.0, 10.0, 16.0, 16.0]] == [_sharp_reference(mask, box)]
    # With the released kernel the side moves too (by one pixel here), exactly as the loop reference.
    released = MBRM()(mask[None], torch.tensor([box]))
    assert released[0, 0].item() < 12.0 and released.tolist() == [_reference(mask, box)]


def test_prior_truncation():
    """sigma = 1: density at 3 px = 0.00443 > 0.0044 (reachable), at 4 px 0.00013 (truncated to 0)."""
    mask = _step_mask(40, 40, (10, 19), (10, 19))  # x1 = 10
    reachable_box, truncated_box = [13.0, 10.0, 20.0, 20.0], [14.0, 10.0, 20.0, 20.0]
    reachable = _sharp_mbrm()(mask[None], torch.tensor([reachable_box]))
    truncated = _sharp_mbrm()(mask[None], torch.tensor([truncated_box]))
    assert reachable[0, 0].item() == 10.0
    assert truncated[0, 0].item() != 10.0
    assert truncated.tolist() == [_sharp_reference(mask, truncated_box)]
    # Without truncation the sharp likelihood would win at 4 px as well.
    untruncated = _sharp_mbrm()
    untruncated.prior_cutoff = 0.0
    assert untruncated(mask[None], torch.tensor([truncated_box]))[0, 0].item() == 10.0


def test_random_soft_masks_match_reference():
    generator = torch.Generator().manual_seed(0)
    masks, boxes = [], []
    for _ in range(6):
        x1, y1 = torch.randint(0, 20, (2,), generator=generator).tolist()
        w, h = torch.randint(3, 25, (2,), generator=generator).tolist()
        soft = torch.rand(32, 48, generator=generator) * 0.3
        soft[y1: y1 + h, x1: x1 + w] += 0.6
        masks.append(soft.clamp(max=1))
        jitter = (torch.rand(4, generator=generator) * 4 - 2).tolist()
        boxes.append([x1 + jitter[0], y1 + jitter[1], x1 + w + jitter[2], y1 + h + jitter[3]])
    refined = MBRM()(torch.stack(masks), torch.tensor(boxes))
    expected = [_reference(m, b) for m, b in zip(masks, boxes)]
    assert torch.allclose(refined, torch.tensor(expected))


def test_border_edges():
    mask = _step_mask(20, 20, (0, 19), (0, 9))  # touches left, top and right borders
    box = [1.0, 1.0, 19.0, 10.0]
    refined = _sharp_mbrm()(mask[None], torch.tensor([box]))
    assert refined.tolist() == [[0.0, 0.0, 20.0, 10.0]] == [_sharp_reference(mask, box)]
    outward = [2.0, 2.0, 18.0, 11.0]  # the released kernel at the borders: as the loop reference
    assert MBRM()(mask[None], torch.tensor([outward])).tolist() == [_reference(mask, outward)]


def test_empty_input_and_bad_input():
    out = MBRM()(torch.zeros(0, 20, 30), torch.zeros(0, 4))
    assert out.shape == (0, 4)
    with pytest.raises(ValueError, match="boxes but"):
        MBRM()(torch.zeros(2, 20, 30), torch.zeros(3, 4))
    with pytest.raises(ValueError, match=r"\(N, 4\)"):
        MBRM()(torch.zeros(1, 20, 30), torch.zeros(1, 5))
    with pytest.raises(ValueError, match="masks must be"):
        MBRM()(torch.zeros(20, 30), torch.zeros(1, 4))
    with pytest.raises(ValueError, match="nan"):
        MBRM()(torch.zeros(1, 20, 30), torch.tensor([[0.0, 0.0, float("nan"), 3.0]]))


def test_loss_matches_reference():
    mbrm = MBRM()
    mask = _step_mask(24, 32, (6, 20), (4, 15)) * 0.8 + 0.1
    box = torch.tensor([[7.0, 3.0, 20.0, 17.0]])
    gt = torch.tensor([[6.0, 4.0, 21.0, 16.0]])
    x_prof, y_prof = MBRM.profiles(mask[None])
    loss = mbrm.loss(x_prof, y_prof, box, gt)

    def side_nll(profile, centre, size, target, low):
        kernel = OFFICIAL_KERNEL if low else OFFICIAL_KERNEL[::-1]
        post = []
        for e in range(len(profile) + 1):
            lik = _sigmoid(_response(profile, e - 1 if low else e, kernel, OFFICIAL_BIAS))
            post.append(lik * _prior(e, centre, size))
        return -math.log(post[target] / sum(post))

    xp, yp = x_prof[0].tolist(), y_prof[0].tolist()
    expected = (side_nll(xp, 7.0, 13.0, 6, True) + side_nll(xp, 20.0, 13.0, 21, False)
                + side_nll(yp, 3.0, 14.0, 4, True) + side_nll(yp, 17.0, 14.0, 16, False)) / 4
    assert loss.item() == pytest.approx(expected, rel=1e-4)
    # An unreachable GT side (outside the truncated prior) is left out, not infinite.
    far_gt = torch.tensor([[0.0, 4.0, 21.0, 16.0]])
    assert torch.isfinite(mbrm.loss(x_prof, y_prof, box, far_gt))
    # A GT side past the image (here the bottom of the shorter axis, H = 24) is clamped to the border position.
    border_box = torch.tensor([[7.0, 3.0, 20.0, 22.5]])
    beyond = mbrm.loss(x_prof, y_prof, border_box, torch.tensor([[6.0, 4.0, 21.0, 27.0]]))
    expected = (side_nll(xp, 7.0, 13.0, 6, True) + side_nll(xp, 20.0, 13.0, 21, False)
                + side_nll(yp, 3.0, 19.5, 4, True) + side_nll(yp, 22.5, 19.5, 24, False)) / 4
    assert beyond.item() == pytest.approx(expected, rel=1e-4)
    # A side whose whole prior is truncated (peak density 1 / (sqrt(2 pi) 0.05 * 2040) < 0.0044) is left out,
    # and the other box's sides still train: finite loss and gradients.
    wide = torch.zeros(2, 300, 2100)
    wide[:, 50:250, 20:2060] = 1.0
    wide_boxes = torch.tensor([[20.0, 50.0, 2060.0, 250.0], [100.0, 50.0, 900.0, 250.0]])
    wide_x, wide_y = MBRM.profiles(wide)
    mbrm.zero_grad()
    mixed = mbrm.loss(wide_x, wide_y, wide_boxes, wide_boxes)
    mixed.backward()
    assert torch.isfinite(mixed) and torch.isfinite(mbrm.weight.grad).all() and mbrm.weight.grad.abs().sum() > 0
    # Left out: the wide box's x1 and x2 (the reference's prior is 0 at every position), so the mean is over
    # its y sides (2) and the other box's sides (4), each from the loop reference.
    assert max(_prior(e, 20.0, 2040.0) for e in range(2101)) == 0.0
    wxp, wyp = wide_x[0].tolist(), wide_y[0].tolist()  # both masks are the same
    expected = (2 * (side_nll(wyp, 50.0, 200.0, 50, True) + side_nll(wyp, 250.0, 200.0, 250, False))
                + side_nll(wxp, 100.0, 800.0, 100, True) + side_nll(wxp, 900.0, 800.0, 900, False)) / 6
    assert mixed.item() == pytest.approx(expected, rel=1e-4)
    # Nothing to train on: zero, with a gradient path.
    empty = mbrm.loss(torch.zeros(0, 32), torch.zeros(0, 24), torch.zeros(0, 4), torch.zeros(0, 4))
    assert empty.item() == 0.0 and empty.requires_grad


def test_training_lowers_loss_from_zero_kernel():
    """A kernel trained from zero (s = 3, no released constants) learns to find the edges."""
    torch.manual_seed(0)
    mbrm = MBRM(kernel_half_size=3)
    masks, boxes, gts = [], [], []
    for i in range(16):
        x1, y1, w, h = 5 + i % 7, 4 + i % 5, 12 + i % 9, 10 + i % 6
        soft = torch.full((40, 48), 0.05)
        soft[y1: y1 + h, x1: x1 + w] = 0.9
        masks.append(soft)
        gts.append([x1, y1, x1 + w, y1 + h])
        boxes.append([x1 + (i % 3) - 1, y1 - (i % 3) + 1, x1 + w + 1, y1 + h - 1])
    x_prof, y_prof = MBRM.profiles(torch.stack(masks))
    boxes, gts = torch.tensor(boxes, dtype=torch.float32), torch.tensor(gts, dtype=torch.float32)
    optimizer = torch.optim.Adam(mbrm.parameters(), lr=0.1)
    history = []
    for _ in range(60):
        loss = mbrm.loss(x_prof, y_prof, boxes, gts)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history.append(loss.item())
    assert history[-1] < 0.5 * history[0]
    refined = mbrm.refine(x_prof, y_prof, boxes)
    assert (refined - gts).abs().mean() < (boxes - gts).abs().mean()
