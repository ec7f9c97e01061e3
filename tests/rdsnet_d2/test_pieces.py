"""Correlation, cropping and the OHEM mask loss against loop-based references."""
import math

import pytest
import torch

from rdsnet_d2 import correlate, crop_axes, crop_masks, expanded_crop_boxes, ohem_mask_loss
from rdsnet_d2.correlation import box_coordinate_logits


def test_correlation_batched_equals_per_instance():
    torch.manual_seed(0)
    pixel_reps = torch.randn(3, 8, 5, 7)
    object_reps = torch.randn(6, 2, 8)
    image_indices = torch.tensor([2, 0, 2, 2, 0, 1])
    logits = correlate(pixel_reps, object_reps, image_indices)
    assert logits.shape == (6, 2, 5, 7)
    for n in range(6):
        for s in range(2):
            for y in range(5):
                for x in range(7):
                    expected = sum(float(object_reps[n, s, k]) * float(pixel_reps[image_indices[n], k, y, x])
                                   for k in range(8))
                    assert float(logits[n, s, y, x]) == pytest.approx(expected, abs=1e-4)


def test_correlation_of_one_image_without_indices_matches_loop():
    torch.manual_seed(0)
    pixel_reps = torch.randn(1, 8, 4, 5)
    object_reps = torch.randn(3, 2, 8)
    logits = correlate(pixel_reps, object_reps)  # inference: one image, no indices to read back
    assert logits.shape == (3, 2, 4, 5)
    for n in range(3):
        for s in range(2):
            for y in range(4):
                for x in range(5):
                    expected = sum(float(object_reps[n, s, k]) * float(pixel_reps[0, k, y, x]) for k in range(8))
                    assert float(logits[n, s, y, x]) == pytest.approx(expected, abs=1e-4)
    assert correlate(pixel_reps, object_reps[:0]).shape == (0, 2, 4, 5)
    with pytest.raises(ValueError, match="image_indices are needed for a batch of 2 images"):
        correlate(torch.randn(2, 8, 4, 5), object_reps)


def test_crop_axes_outer_product_is_the_crop_mask():
    crops = torch.tensor([[1, 2, 4, 5], [0, 0, 6, 3]])
    rows, cols = crop_axes(crops, 5, 6)
    assert rows.shape == (2, 5) and cols.shape == (2, 6)
    for n, (x1, y1, x2, y2) in enumerate(crops.tolist()):
        assert rows[n].tolist() == [y1 <= y < y2 for y in range(5)]
        assert cols[n].tolist() == [x1 <= x < x2 for x in range(6)]
    assert torch.equal(rows[:, :, None] & cols[:, None, :], crop_masks(crops, 5, 6))


def test_box_coordinate_logits_match_loop():
    torch.manual_seed(0)
    coefficients = torch.randn(3, 2, 4)
    # a box 4 x 6 pixels, one thinner than a pixel (half-size clamped to 1), one off the map's origin
    boxes = torch.tensor([[1.0, 2.0, 5.0, 8.0], [2.0, 3.0, 2.5, 6.0], [0.0, 0.0, 7.0, 1.0]])
    logits = box_coordinate_logits(coefficients, boxes, 9, 7)
    assert logits.shape == (3, 2, 9, 7)
    for n in range(3):
        x0, y0, x1, y1 = boxes[n].tolist()
        half_w, half_h = max((x1 - x0) / 2, 1.0), max((y1 - y0) / 2, 1.0)
        for s in range(2):
            a, b, c, d = coefficients[n, s].tolist()
            for y in range(9):
                for x in range(7):
                    u = (x + 0.5 - (x0 + x1) / 2) / half_w
                    v = (y + 0.5 - (y0 + y1) / 2) / half_h
                    expected = a * u + b * v + c * u * u + d * v * v
                    assert float(logits[n, s, y, x]) == pytest.approx(expected, abs=1e-4)
    assert box_coordinate_logits(coefficients[:0], boxes[:0], 9, 7).shape == (0, 2, 9, 7)
    with pytest.raises(ValueError, match="coefficients"):
        box_coordinate_logits(torch.randn(3, 2, 3), boxes, 9, 7)


def test_correlation_gradients_and_empty():
    pixel_reps = torch.randn(2, 4, 3, 3, requires_grad=True)
    object_reps = torch.randn(3, 2, 4, requires_grad=True)
    correlate(pixel_reps, object_reps, torch.tensor([1, 1, 0])).sum().backward()
    assert pixel_reps.grad.abs().sum() > 0 and object_reps.grad.abs().sum() > 0
    assert correlate(pixel_reps, object_reps[:0], torch.zeros(0, dtype=torch.long)).shape == (0, 2, 3, 3)
    with pytest.raises(ValueError, match="object_reps"):
        correlate(pixel_reps, torch.randn(3, 4), torch.tensor([0, 0, 0]))
    for bad in ([0, 2, 1], [0, -1, 1]):  # an image the batch does not have
        with pytest.raises(ValueError, match=r"image_indices must lie in \[0, 2\)"):
            correlate(pixel_reps, object_reps, torch.tensor(bad))


def _reference_crop(box, expand, height, width):
    x1, y1, x2, y2 = box
    pad_x = max(expand * (x2 - x1 + 1), 1)
    pad_y = max(expand * (y2 - y1 + 1), 1)
    cx1, cy1 = int(max(x1 - pad_x, 0)), int(max(y1 - pad_y, 0))
    cx2, cy2 = int(min(x2 + pad_x, width)), int(min(y2 + pad_y, height))
    return [[cx1 <= x < cx2 and cy1 <= y < cy2 for x in range(width)] for y in range(height)]


@pytest.mark.parametrize("expand", [0.25, 0.1, 0.0])
def test_expanded_crop_matches_reference(expand):
    boxes = torch.tensor([[3.2, 4.7, 10.1, 12.9], [0.0, 0.0, 2.0, 1.0], [14.5, 2.0, 20.0, 6.0], [7.0, 7.0, 7.0, 7.0]])
    masks = crop_masks(expanded_crop_boxes(boxes, expand, 16, 20), 16, 20)
    for box, mask in zip(boxes.tolist(), masks):
        assert mask.tolist() == _reference_crop(box, expand, 16, 20)


def test_crop_expansion_examples():
    # 8-px box at p = 0.25: pad = 0.25 * 9 = 2.25 per side -> [1.75, 14.25), truncated to [1, 14).
    crop = expanded_crop_boxes(torch.tensor([[4.0, 4.0, 12.0, 12.0]]), 0.25, 32, 32)
    assert crop.tolist() == [[1, 1, 14, 14]]
    # a tiny box still gets the 1-pixel minimum pad; crops stop at the map border
    assert expanded_crop_boxes(torch.tensor([[0.0, 5.0, 1.0, 6.0]]), 0.1, 8, 8).tolist() == [[0, 4, 2, 7]]
    with pytest.raises(ValueError):
        expanded_crop_boxes(torch.zeros(1, 4), -0.1, 8, 8)


def _reference_ohem(logits, targets, ratio=1.0):
    total = 0.0
    num = logits.shape[0]
    for n in range(num):
        pos, neg = [], []
        for y in range(targets.shape[1]):
            for x in range(targets.shape[2]):
                fg, bg = float(logits[n, 1, y, x]), float(logits[n, 0, y, x])
                log_norm = math.log(math.exp(fg) + math.exp(bg))
                t = int(targets[n, y, x])
                if t == 1:
                    pos.append(log_norm - fg)
                elif t == 0:
                    neg.append(log_norm - bg)
        k = min(int(len(pos) * ratio), targets.shape[1] * targets.shape[2] - 1)
        kept = sorted(neg, reverse=True)[:k]
        total += (sum(pos) + sum(kept)) / (len(pos) + len(kept) + 1)
    return total / (num + 1)


@pytest.mark.parametrize("ratio", [1.0, 3.0, 0.5])
def test_ohem_matches_reference(ratio):
    torch.manual_seed(1)
    logits = torch.randn(4, 2, 6, 5)
    targets = torch.randint(-1, 2, (4, 6, 5))
    targets[2] = torch.where(targets[2] == 1, torch.zeros_like(targets[2]), targets[2])  # no positives
    targets[3] = torch.where(targets[3] == 0, torch.ones_like(targets[3]), targets[3])  # no negatives
    loss = ohem_mask_loss(logits, targets, ratio)
    assert loss.item() == pytest.approx(_reference_ohem(logits, targets, ratio), rel=1e-5)


def test_ohem_selects_the_hardest_negatives():
    logits = torch.zeros(1, 2, 1, 4)
    logits[0, 1, 0] = torch.tensor([5.0, 1.0, -2.0, 3.0])  # foreground logit; negatives at 1..3
    targets = torch.tensor([[[1, 0, 0, 0]]])
    # one positive -> one negative kept: the hardest is pixel 3 (CE = log(1 + e^3))
    expected = (math.log(1 + math.exp(-5.0)) + math.log(1 + math.exp(3.0))) / 3 / 2
    assert ohem_mask_loss(logits, targets).item() == pytest.approx(expected, rel=1e-5)


def test_ohem_empty_and_bad_shapes():
    logits = torch.zeros(0, 2, 4, 4, requires_grad=True)
    loss = ohem_mask_loss(logits, torch.zeros(0, 4, 4, dtype=torch.long))
    assert loss.item() == 0.0
    with pytest.raises(ValueError, match="ohem_mask_loss"):
        ohem_mask_loss(torch.zeros(2, 2, 4, 4), torch.zeros(2, 4, 5, dtype=torch.long))
    for bad in (255, -2):  # e.g. a segmentation "ignore" label
        targets = torch.zeros(2, 4, 4, dtype=torch.long)
        targets[1, 2, 3] = bad
        with pytest.raises(ValueError, match="targets must be 1 .*, 0 .* or -1"):
            ohem_mask_loss(torch.zeros(2, 2, 4, 4), targets)


def test_object_representations_at_anchors_equal_the_dense_map():
    """The representations read at a few anchors (levels of different widths, two images, border cells)
    equal the dense ``rep_pred`` map at those anchors, in RetinaNet's anchor order (level, row, column,
    anchor), computed here with a loop over the anchors."""
    from rdsnet_d2.object_stream import RDSNetHead

    torch.manual_seed(0)
    head = RDSNetHead(in_channels=6, num_anchors=3, num_classes=2, rep_dim=4, num_convs=1, norm="")
    torch.nn.init.normal_(head.rep_pred.weight)
    torch.nn.init.normal_(head.rep_pred.bias)
    features = [torch.randn(2, 6, 5, 7), torch.randn(2, 6, 3, 4), torch.randn(2, 6, 1, 2)]
    with torch.no_grad():
        rep_features = head(features)[2]
        dense = [head.rep_pred(f) for f in rep_features]
    flat_index, expected_by_anchor = 0, {}
    for level_map in dense:
        _, _, height, width = level_map.shape
        for row in range(height):
            for col in range(width):
                for anchor in range(3):
                    channels = slice(anchor * 8, (anchor + 1) * 8)  # the anchor's 2 x d channels
                    for image in range(2):
                        expected_by_anchor[(image, flat_index)] = level_map[image, channels, row, col]
                    flat_index += 1
    assert flat_index == 3 * (35 + 12 + 2)
    picks = [(0, 0), (1, 104), (0, 104), (1, 40), (0, 105), (1, 140), (0, 146), (1, 146), (0, 34)]
    images = torch.tensor([p[0] for p in picks])
    anchors = torch.tensor([p[1] for p in picks])
    with torch.no_grad():
        got = head.object_representations(rep_features, images, *head.anchor_positions(rep_features, anchors))
    assert got.shape == (len(picks), 2, 4)
    for i, pick in enumerate(picks):
        torch.testing.assert_close(got[i].flatten(), expected_by_anchor[pick], rtol=1e-5, atol=1e-5)
    empty = head.object_representations(rep_features, images[:0], *head.anchor_positions(rep_features, anchors[:0]))
    assert empty.shape == (0, 2, 4)

    # Training: the gradients reaching rep_pred and the tower's features equal the dense map's.
    weights = torch.randn(len(picks), 8)
    rep_features = [f.detach().requires_grad_() for f in rep_features]
    sparse = head.object_representations(rep_features, images, *head.anchor_positions(rep_features, anchors))
    sparse_grads = torch.autograd.grad((sparse.flatten(1) * weights).sum(), [head.rep_pred.weight, *rep_features])
    dense = [head.rep_pred(f) for f in rep_features]
    total = 0
    for i, (image, flat) in enumerate(picks):
        level = 0 if flat < 105 else 1 if flat < 141 else 2
        local = flat - (0, 105, 141)[level]
        cell, anchor = divmod(local, 3)
        row, col = divmod(cell, dense[level].shape[-1])
        total = total + (dense[level][image, anchor * 8:(anchor + 1) * 8, row, col] * weights[i]).sum()
    dense_grads = torch.autograd.grad(total, [head.rep_pred.weight, *rep_features])
    for a, b in zip(sparse_grads, dense_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
