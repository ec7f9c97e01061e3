"""SOLO family pieces against loop-based references written here (not the vectorised code)."""
import math

import pytest
import torch

from adet_lite.solo import mask_nms, matrix_nms, point_nms
from adet_lite.solo.nms import pair_intersections, same_label_mask_iou
from adet_lite.solo.inference import GridInferenceParams, select_instances
from adet_lite.solo.losses import solo_category_loss, solo_mask_loss
from adet_lite.solo.solo_mask_branch import DecoupledSOLOMaskBranch
from adet_lite.solo.solov2_mask_branch import KernelBranch, MaskFeatureBranch, SOLOv2MaskBranch
from adet_lite.solo.targets import assign_grid_targets
from adet_lite.solo.towers import with_coordinates
from d2ext.layers import coordinate_features
from d2ext.testing import bilinear_resize_reference


def _iou(a, b):
    inter = (a & b).sum().item()
    union = (a | b).sum().item()
    return inter / union if union else 0.0


def _random_masks(num, size=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    masks = torch.zeros(num, size, size, dtype=torch.bool)
    for i in range(num):
        x0, y0 = torch.randint(0, size - 4, (2,), generator=g).tolist()
        w, h = torch.randint(3, 8, (2,), generator=g).tolist()
        masks[i, y0:y0 + h, x0:x0 + w] = True
    return masks


@pytest.mark.parametrize("kernel", ["gaussian", "linear"])
def test_matrix_nms_matches_pairwise_loop(kernel):
    masks = _random_masks(14)
    masks[5] = masks[2]  # an exact duplicate
    labels = torch.tensor([0, 1, 0, 0, 1, 0, 1, 0, 0, 1, 1, 0, 0, 1])
    scores = torch.rand(14, generator=torch.Generator().manual_seed(1))
    sigma = 2.0
    decayed = matrix_nms(masks, labels, scores, kernel=kernel, sigma=sigma)

    order = sorted(range(14), key=lambda i: -scores[i].item())
    n = len(order)
    iou = [[0.0] * n for _ in range(n)]  # iou[a][b]: a ranked above b, same label
    for a in range(n):
        for b in range(a + 1, n):
            if labels[order[a]] == labels[order[b]]:
                iou[a][b] = _iou(masks[order[a]], masks[order[b]])
    compensation = [max(iou[k][a] for k in range(n)) for a in range(n)]
    f = (lambda x: math.exp(-sigma * x * x)) if kernel == "gaussian" else (lambda x: 1 - x)
    for b in range(n):
        ratios = []
        for a in range(n):
            denominator = max(f(compensation[a]), 1e-6) if kernel == "linear" else f(compensation[a])
            ratios.append(f(iou[a][b]) / denominator)
        expected = scores[order[b]].item() * min(ratios)
        assert decayed[order[b]].item() == pytest.approx(expected, rel=1e-4, abs=1e-6)
    # The top-scored mask is never decayed; the duplicate of a higher mask is decayed.
    assert decayed[order[0]] == scores[order[0]]
    assert decayed[5] < scores[5] or decayed[2] < scores[2]


def test_pair_intersections_count_shared_pixels():
    # 13 x 13 = 169 pixels, not a multiple of 8; bool masks take the int8 product on a CPU, 0/1 floats the
    # float32 one: both must give the loop's counts.
    masks = _random_masks(11, size=13, seed=4).flatten(1)
    masks[3] = False
    for given in (masks, masks.float()):
        counts = pair_intersections(given)
        assert counts.dtype == torch.float32 and counts.shape == (11, 11)
        for a in range(11):
            for b in range(11):
                assert counts[a, b].item() == sum(bool(x and y) for x, y in zip(masks[a], masks[b])), (a, b)
    assert pair_intersections(masks[:0]).shape == (0, 0)


def test_same_label_mask_iou_matches_pairwise_loop():
    masks = _random_masks(15, seed=6)
    masks[9] = masks[4]  # an exact duplicate, same label
    masks[11] = False  # an empty mask
    labels = torch.tensor([3, 0, 3, 7, 0, 3, 3, 7, 1, 0, 3, 0, 7, 3, 3])  # label 1 alone
    iou = same_label_mask_iou(masks, labels)
    for a in range(15):
        for b in range(15):
            expected = _iou(masks[a], masks[b]) if labels[a] == labels[b] else 0.0
            assert iou[a, b].item() == pytest.approx(expected, abs=1e-6), (a, b)
    assert same_label_mask_iou(masks[:0], labels[:0]).shape == (0, 0)


def test_same_label_mask_iou_traces_for_other_label_counts():
    # The per-label blocks have data-dependent sizes: a trace must not freeze those of the tracing input.
    traced = torch.jit.trace(same_label_mask_iou, (_random_masks(6), torch.tensor([0, 0, 1, 1, 2, 2])))
    masks, labels = _random_masks(9, seed=2), torch.tensor([1, 1, 1, 1, 0, 2, 1, 0, 1])
    assert torch.equal(traced(masks, labels), same_label_mask_iou(masks, labels))


def test_matrix_nms_empty_and_bad_kernel():
    empty = matrix_nms(torch.zeros(0, 4, 4, dtype=torch.bool), torch.zeros(0, dtype=torch.long), torch.zeros(0))
    assert empty.shape == (0,)
    with pytest.raises(ValueError, match="kernel"):
        matrix_nms(_random_masks(2), torch.zeros(2, dtype=torch.long), torch.rand(2), kernel="box")


def test_mask_nms_matches_greedy_loop():
    masks = _random_masks(20, seed=3)
    labels = torch.randint(0, 2, (20,), generator=torch.Generator().manual_seed(4))
    scores = torch.rand(20, generator=torch.Generator().manual_seed(5))
    kept = mask_nms(masks, labels, scores, iou_threshold=0.3).tolist()
    expected = []
    for i in sorted(range(20), key=lambda i: -scores[i].item()):
        if all(labels[j] != labels[i] or _iou(masks[i], masks[j]) <= 0.3 for j in expected):
            expected.append(i)
    assert kept == expected


def test_point_nms_keeps_maxima_of_2x2_windows_ending_at_each_cell():
    scores = torch.rand(1, 2, 6, 6, generator=torch.Generator().manual_seed(6))
    scores[0, 0, 2, 2] = scores[0, 0, 2, 3] = 0.99  # a tie
    out = point_nms(scores)
    for c in range(2):
        for i in range(6):
            for j in range(6):
                window = [scores[0, c, a, b].item() for a in (i - 1, i) for b in (j - 1, j) if a >= 0 and b >= 0]
                expected = scores[0, c, i, j].item() if scores[0, c, i, j].item() >= max(window) else 0.0
                assert out[0, c, i, j].item() == pytest.approx(expected)
    assert out[0, 0, 2, 2] == 0.99 and out[0, 0, 2, 3] == 0.99


def test_dice_mask_loss_reference_form():
    probs = torch.rand(3, 5, 5, generator=torch.Generator().manual_seed(7))
    targets = (torch.rand(3, 5, 5, generator=torch.Generator().manual_seed(8)) > 0.5).float()
    loss = solo_mask_loss([probs], [targets], num_positives=3, weight=3.0)
    expected = 0.0
    for k in range(3):
        p, t = probs[k].flatten().tolist(), targets[k].flatten().tolist()
        inter = sum(a * b for a, b in zip(p, t))
        expected += 1 - 2 * inter / (sum(a * a for a in p) + 1e-3 + sum(b * b for b in t) + 1e-3)
    assert loss.item() == pytest.approx(3.0 * expected / 3, rel=1e-5)
    # No positive: zero, but still a tensor connected to the predictions.
    none = solo_mask_loss([probs[:0].requires_grad_()], [targets[:0]], num_positives=0, weight=3.0)
    assert none.item() == 0.0 and none.requires_grad


def test_category_loss_is_focal_over_all_cells_per_positive_cell():
    """Sum of the per-(cell, class) sigmoid focal terms (a loop) / (positive cells + 1): cells, however many
    instances (SOLOv2's pairs) train their masks."""
    generator = torch.Generator().manual_seed(3)
    num_classes, alpha, gamma = 3, 0.25, 2.0
    logits = [torch.randn(2, num_classes, s, s, generator=generator) for s in (4, 2)]
    labels = [torch.full((2, s * s), num_classes) for s in (4, 2)]
    labels[0][0, 5], labels[0][1, 0], labels[1][1, 3] = 2, 0, 1  # 3 positive cells
    expected = 0.0
    for level_logits, level_labels in zip(logits, labels):
        for b in range(2):
            for cell in range(level_labels.shape[1]):
                for c in range(num_classes):
                    x = level_logits[b, c].flatten()[cell].item()
                    p, t = 1 / (1 + math.exp(-x)), float(level_labels[b, cell].item() == c)
                    p_t = p * t + (1 - p) * (1 - t)
                    alpha_t = alpha * t + (1 - alpha) * (1 - t)
                    expected += -alpha_t * (1 - p_t) ** gamma * math.log(p_t)
    loss = solo_category_loss(logits, labels, alpha, gamma, weight=1.0)
    assert loss.item() == pytest.approx(expected / (3 + 1), rel=1e-5)


def _reference_grid_targets(masks, boxes, classes, num_grid, low, high, sigma, deduplicate):
    """Straightforward per-instance loops (row-major cells; later instances overwrite)."""
    height, width = masks.shape[-2:]
    labels = {}
    pairs = []
    for n in range(masks.shape[0]):
        x1, y1, x2, y2 = boxes[n].tolist()
        scale = math.sqrt((x2 - x1) * (y2 - y1))
        if not (low <= scale <= high) or masks[n].sum() == 0:
            continue
        ys, xs = torch.nonzero(masks[n], as_tuple=True)
        cy, cx = ys.float().mean().item(), xs.float().mean().item()
        cell = lambda v, extent: int((v / extent) / (1.0 / num_grid))  # noqa: E731 (trunc as the reference)
        ci, cj = cell(cy, height), cell(cx, width)
        hh, hw = 0.5 * (y2 - y1) * sigma, 0.5 * (x2 - x1) * sigma
        top = max(max(0, cell(cy - hh, height)), ci - 1)
        bottom = min(min(num_grid - 1, cell(cy + hh, height)), ci + 1)
        left = max(max(0, cell(cx - hw, width)), cj - 1)
        right = min(min(num_grid - 1, cell(cx + hw, width)), cj + 1)
        for i in range(top, bottom + 1):
            for j in range(left, right + 1):
                labels[i * num_grid + j] = (int(classes[n]), n)
                pairs.append((i * num_grid + j, n))
    if deduplicate:
        pairs = sorted((c, n) for c, (_, n) in labels.items())
    return {c: lab for c, (lab, _) in labels.items()}, pairs


@pytest.mark.parametrize("deduplicate", [True, False])
def test_grid_assignment_matches_loop_reference(deduplicate):
    size = 64
    masks = torch.zeros(5, size, size, dtype=torch.bool)
    masks[0, 10:30, 8:40] = True          # big box
    masks[1, 12:20, 10:18] = True         # small, overlapping the first one's centre region
    masks[2, 40:60, 40:44] = True         # thin
    masks[2, 40:44, 44:60] = True         # L-shape: centre of mass off the box centre
    masks[3, 25:29, 20:24] = True         # overwrites part of 0's cells (later instance)
    # 4: empty mask (degenerate): trains nothing
    boxes = torch.tensor([[8, 10, 40, 30], [10, 12, 18, 20], [40, 40, 60, 60], [20, 25, 24, 29], [1, 1, 9, 9]],
                         dtype=torch.float32)
    classes = torch.tensor([0, 1, 2, 3, 1])
    grids, ranges = [8, 6], [(1, 12), (8, 64)]
    # Level 0's mask canvas is a row taller and a column narrower than the 16 x 16 downsampled masks:
    # targets are pasted top-left and cut at the canvas.
    mask_sizes = [(17, 15), (8, 8)]
    targets = assign_grid_targets(masks, boxes, classes, num_classes=4, num_grids=grids, scale_ranges=ranges,
                                  sigma=0.5, mask_sizes=mask_sizes, mask_strides=[4, 8],
                                  deduplicate_cells=deduplicate)
    for level, (num_grid, (low, high)) in enumerate(zip(grids, ranges)):
        expected_labels, expected_pairs = _reference_grid_targets(
            masks, boxes, classes, num_grid, low, high, 0.5, deduplicate)
        labels = targets[level].labels
        for c in range(num_grid * num_grid):
            assert labels[c].item() == expected_labels.get(c, 4), (level, c)
        got_pairs = list(zip(targets[level].cells.tolist(), targets[level].gt_indices.tolist()))
        assert got_pairs == expected_pairs
        stride = [4, 8][level]
        for k, (_, n) in enumerate(got_pairs):
            down = bilinear_resize_reference(masks[n].float(), (size // stride, size // stride)) >= 0.5
            expected = torch.zeros(mask_sizes[level], dtype=torch.bool)
            h, w = min(expected.shape[0], down.shape[0]), min(expected.shape[1], down.shape[1])
            expected[:h, :w] = down[:h, :w]
            assert torch.equal(targets[level].masks[k].bool(), expected)
    # Level 0 sees instances 1 and 3 (scale 8 and 4), level 1 sees 0, 1 and 2 (ranges overlap).
    assert set(targets[0].gt_indices.tolist()) == {1, 3}
    assert set(targets[1].gt_indices.tolist()) == {0, 1, 2}
    # Cell (1, 1) of level 1 is in both 0's and 1's regions: the later instance (1) wins it.
    assert targets[1].labels[1 * 6 + 1].item() == 1


def test_coverage_mask_targets_are_block_fractions():
    """COVERAGE_MASK_TARGETS: each target pixel is the fraction of its stride x stride block the mask covers
    (a loop over the blocks); the binarised targets set a block that is exactly half covered."""
    size, stride = 32, 4
    masks = torch.zeros(2, size, size, dtype=torch.bool)
    masks[0, 5:19, 6:23] = True            # sides off the block grid: partly covered blocks on every side
    masks[1, 9:31, 2:11] = True
    boxes = torch.tensor([[6, 5, 23, 19], [2, 9, 11, 31]], dtype=torch.float32)
    common = dict(num_classes=2, num_grids=[4], scale_ranges=[(1, 64)], sigma=0.2, mask_sizes=[(9, 7)],
                  mask_strides=[stride], deduplicate_cells=True)
    coverage = assign_grid_targets(masks, boxes, torch.tensor([0, 1]), coverage_mask_targets=True, **common)[0]
    binary = assign_grid_targets(masks, boxes, torch.tensor([0, 1]), **common)[0]
    assert coverage.gt_indices.tolist() == binary.gt_indices.tolist() and coverage.gt_indices.numel() > 0
    for k, n in enumerate(coverage.gt_indices.tolist()):
        expected = torch.zeros(9, 7)
        for i in range(size // stride):
            for j in range(7):  # the canvas is a row taller and a column narrower than the 8 x 8 blocks
                block = masks[n, i * stride:(i + 1) * stride, j * stride:(j + 1) * stride]
                expected[i, j] = block.float().mean()
        assert torch.allclose(coverage.masks[k], expected)
        assert set(binary.masks[k].unique().tolist()) <= {0.0, 1.0}
    half = coverage.masks == 0.5
    assert half.any() and (binary.masks[half] == 1).all()


def test_grid_assignment_without_instances():
    targets = assign_grid_targets(torch.zeros(0, 32, 32, dtype=torch.bool), torch.zeros(0, 4), torch.zeros(0, dtype=torch.long),
                                  num_classes=3, num_grids=[4], scale_ranges=[(1, 64)], sigma=0.2,
                                  mask_sizes=[(8, 8)], mask_strides=[4], deduplicate_cells=True)
    assert (targets[0].labels == 3).all() and targets[0].masks.shape == (0, 8, 8)


@pytest.mark.parametrize("shared_tower", [False, True])
def test_decoupled_cell_mask_is_row_y_times_column_x(shared_tower):
    torch.manual_seed(0)
    branch = DecoupledSOLOMaskBranch(in_channels=8, channels=8, num_convs=1, norm="", num_grids=[5, 3],
                                     prior_prob=0.01, shared_tower=shared_tower)
    outputs = branch([torch.randn(2, 8, 6, 7), torch.randn(2, 8, 3, 4)])
    assert outputs[0][0].shape == (2, 5, 12, 14) and outputs[1][1].shape == (2, 3, 6, 8)
    cells = torch.tensor([0, 4, 7, 13, 24])
    probs = branch.mask_probs(outputs, 1, 0, cells)
    for k, cell in enumerate(cells.tolist()):
        row, col = cell // 5, cell % 5
        expected = outputs[0][1][1, row].sigmoid() * outputs[0][0][1, col].sigmoid()
        assert torch.allclose(probs[k], expected)


@pytest.mark.parametrize("upsample_factor, relative_coord_terms", [(1, False), (2, False), (2, True)])
def test_solov2_cell_mask_is_its_kernel_applied_to_the_mask_features(upsample_factor, relative_coord_terms):
    """sigmoid(kernel . features) per pixel, plus with ``relative_coord_terms`` the cell's 4 coefficients times
    x, y, x^2, y^2: the pixel centre's offset from the cell centre in units of 4 cells."""
    torch.manual_seed(0)
    num_kernels = 6
    branch = SOLOv2MaskBranch(
        kernel_branch=KernelBranch(in_channels=8, channels=8, num_convs=1, norm="", num_grids=[5, 3],
                                   num_kernels=num_kernels + (4 if relative_coord_terms else 0), use_coordinates=True),
        feature_branch=MaskFeatureBranch(in_channels=8, channels=8, out_channels=num_kernels, num_levels=2,
                                         norm="", use_coordinates=True),
        mask_in_features=["p2", "p3"], upsample_factor=upsample_factor, relative_coord_terms=relative_coord_terms)
    for parameter in branch.parameters():  # the N(0, 0.01) initialisation gives logits of about 0
        torch.nn.init.normal_(parameter, std=0.5)
    features = {"p2": torch.randn(2, 8, 6, 8), "p3": torch.randn(2, 8, 3, 4)}
    outputs = branch([torch.randn(2, 8, 6, 7), torch.randn(2, 8, 3, 4)], features)
    kernels, mask_features = outputs
    assert branch.mask_sizes(outputs) == [(6 * upsample_factor, 8 * upsample_factor)] * 2
    cells = torch.tensor([0, 4, 8])
    probs = branch.mask_probs(outputs, 1, 1, cells)
    assert probs.shape == (3, 6 * upsample_factor, 8 * upsample_factor)
    for k, cell in enumerate(cells.tolist()):
        row, col = cell // 3, cell % 3
        kernel = kernels[1][1, :, row, col]
        logits = torch.zeros(6, 8)
        for y in range(6):
            for x in range(8):
                logits[y, x] = sum(kernel[e] * mask_features[1, e, y, x] for e in range(num_kernels))
                if relative_coord_terms:  # cells of 8 / 3 x 6 / 3 feature pixels
                    dx = (x + 0.5 - (col + 0.5) * 8 / 3) / (4 * 8 / 3)
                    dy = (y + 0.5 - (row + 0.5) * 6 / 3) / (4 * 6 / 3)
                    a = kernel[num_kernels:]
                    logits[y, x] += a[0] * dx + a[1] * dy + a[2] * dx * dx + a[3] * dy * dy
        if upsample_factor == 2:
            logits = bilinear_resize_reference(logits, (6 * upsample_factor, 8 * upsample_factor))
        assert torch.allclose(probs[k], logits.sigmoid(), atol=1e-6)


def test_select_instances_keeps_masks_larger_than_their_levels_minimum_area():
    # Two levels of 2 x 2 cells, one class; cells 0 and 1 of each level are candidates.
    scores = [torch.tensor([[[0.9, 0.8], [0.0, 0.0]]]), torch.tensor([[[0.7, 0.6], [0.0, 0.0]]])]
    areas = {(0, 0): 9, (0, 1): 8, (1, 0): 30, (1, 1): 12}  # (level, cell) -> mask pixels

    def cell_mask_probs(levels, cells):
        masks = torch.zeros(len(cells), 8, 8)
        for k, (level, cell) in enumerate(zip(levels.tolist(), cells.tolist())):
            masks[k].view(-1)[: areas[(level, cell)]] = 0.9
            masks[k].view(-1)[-1] = 0.3  # below the mask threshold: not part of the area
        return masks

    params = GridInferenceParams(score_threshold=0.1, mask_threshold=0.5, nms_pre=10, nms_type="matrix",
                                 nms_kernel="gaussian", nms_sigma=2.0, mask_nms_threshold=0.5,
                                 update_threshold=0.0, max_per_image=10)
    # Strictly more pixels than the minimum: level 0 keeps 9 > 8 but not 8; level 1 keeps 30 > 12 only.
    kept_areas = [areas[key] for key in areas if areas[key] > (8, 12)[key[0]]]
    masks, kept_scores, classes = select_instances(scores, [8, 12], cell_mask_probs, params)
    assert sorted((masks > 0.5).flatten(1).sum(dim=1).tolist()) == sorted(kept_areas) == [9, 30]
    assert classes.tolist() == [0, 0]


def test_with_coordinates_appends_the_selected_channels_after_the_features():
    features = torch.randn(2, 3, 4, 5)
    both, only_y = with_coordinates(features), with_coordinates(features, which=(1,))
    assert both.shape == (2, 5, 4, 5) and only_y.shape == (2, 4, 4, 5)
    coords = coordinate_features(4, 5)  # x then y (tests/d2ext/test_coords.py)
    for b in range(2):
        assert torch.equal(both[b, :3], features[b]) and torch.equal(both[b, 3:], coords)
        assert torch.equal(only_y[b, :3], features[b]) and torch.equal(only_y[b, 3], coords[1])
