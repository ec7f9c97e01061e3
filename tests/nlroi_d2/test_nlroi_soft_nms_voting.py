"""Soft-NMS and box voting against loop references of Detectron1's algorithms written here."""
import math

import pytest
import torch

from d2ext.testing import box_iou_reference
from nlroi_d2 import batched_soft_nms, box_voting, soft_nms
from nlroi_d2.inference import PostprocessSettings, applies_soft_postprocess, fast_rcnn_inference_single_image_soft


def reference_soft_nms(boxes, scores, method, sigma, nt, floor):
    """Detectron1's cpu_soft_nms: swap the max to position i, decay the rest, drop below the floor."""
    dets = [(list(b), s, k) for k, (b, s) in enumerate(zip(boxes, scores))]
    n, i = len(dets), 0
    while i < n:
        best = max(range(i, n), key=lambda p: (dets[p][1], -p))
        dets[i], dets[best] = dets[best], dets[i]
        pos = i + 1
        while pos < n:
            ov = box_iou_reference(dets[i][0], dets[pos][0])
            if method == "linear":
                weight = 1 - ov if ov > nt else 1.0
            elif method == "gaussian":
                weight = math.exp(-(ov * ov) / sigma)
            else:
                weight = 0.0 if ov > nt else 1.0
            box, score, k = dets[pos]
            dets[pos] = (box, score * weight, k)
            if dets[pos][1] < floor:
                n -= 1
                dets[pos], dets[n] = dets[n], dets[pos]
                pos -= 1
            pos += 1
        i += 1
    return [d[2] for d in dets[:n]], [d[1] for d in dets[:n]]


def random_boxes(n, seed, size=50.0):
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g) * size
    wh = torch.rand(n, 2, generator=g) * size / 2 + 2
    # Clusters of overlapping boxes: jitter copies of a few centres.
    xy = xy[torch.randint(0, max(1, n // 4), (n,), generator=g)] + torch.randn(n, 2, generator=g) * 3
    return torch.cat([xy, xy + wh], dim=1), torch.rand(n, generator=g)


@pytest.mark.parametrize("method", ["linear", "gaussian", "hard"])
@pytest.mark.parametrize("seed", [0, 1])
def test_soft_nms_matches_detectron1_loop(method, seed):
    boxes, scores = random_boxes(40, seed)
    keep, new_scores = soft_nms(boxes, scores, method, sigma=0.5, iou_threshold=0.3, score_threshold=0.05)
    ref_keep, ref_scores = reference_soft_nms(boxes.tolist(), scores.tolist(), method, 0.5, 0.3, 0.05)
    assert keep.tolist() == ref_keep
    torch.testing.assert_close(new_scores, torch.tensor(ref_scores), rtol=1e-5, atol=1e-6)
    assert len(ref_keep) < 40 or method == "gaussian"  # the case exercises dropping


def test_soft_nms_hard_equals_torchvision_nms():
    from torchvision.ops import nms

    boxes, scores = random_boxes(60, 3)
    keep, new_scores = soft_nms(boxes, scores, "hard", iou_threshold=0.5, score_threshold=1e-4)
    assert keep.tolist() == nms(boxes, scores, 0.5).tolist()
    torch.testing.assert_close(new_scores, scores[keep])


def test_batched_soft_nms_is_per_class():
    boxes, scores = random_boxes(50, 4)
    classes = torch.randint(0, 4, (50,), generator=torch.Generator().manual_seed(0))
    keep, new_scores = batched_soft_nms(boxes, scores, classes, "linear", 0.5, 0.3, 1e-3)
    expected = {}
    for c in range(4):
        members = (classes == c).nonzero().flatten().tolist()
        k, s = reference_soft_nms(boxes[members].tolist(), scores[members].tolist(), "linear", 0.5, 0.3, 1e-3)
        expected.update({members[i]: v for i, v in zip(k, s)})
    assert sorted(keep.tolist()) == sorted(expected)
    for k, s in zip(keep.tolist(), new_scores.tolist()):
        assert s == pytest.approx(expected[k], rel=1e-5)
    assert torch.all(new_scores[:-1] >= new_scores[1:])


def test_soft_nms_empty_and_bad_args():
    keep, scores = soft_nms(torch.zeros(0, 4), torch.zeros(0))
    assert keep.numel() == 0 and scores.numel() == 0
    with pytest.raises(ValueError, match="method"):
        soft_nms(torch.zeros(1, 4), torch.ones(1), method="cubic")
    with pytest.raises(ValueError, match="sigma"):
        soft_nms(torch.zeros(1, 4), torch.ones(1), method="gaussian", sigma=0)
    with pytest.raises(ValueError, match=r"boxes \(R, 4\)"):
        soft_nms(torch.zeros(2, 5), torch.ones(2))


def test_soft_nms_degenerate_boxes():
    boxes = torch.tensor([[0.0, 0, 0, 0], [0, 0, 0, 0], [1, 1, 5, 5]])
    keep, new_scores = soft_nms(boxes, torch.tensor([0.9, 0.8, 0.7]), "linear", iou_threshold=0.3)
    assert torch.isfinite(new_scores).all() and keep.tolist() == [0, 1, 2]


def reference_box_voting(kept_boxes, kept_scores, all_boxes, all_scores, thresh, method, beta):
    """Detectron1's box_voting, one kept box at a time."""
    out_boxes, out_scores = [], []
    for box, score in zip(kept_boxes, kept_scores):
        voters = [(b, s, box_iou_reference(box, b)) for b, s in zip(all_boxes, all_scores)
                  if box_iou_reference(box, b) >= thresh]
        ws = [s for _, s, _ in voters]
        out_boxes.append([sum(s * b[c] for b, s, _ in voters) / sum(ws) for c in range(4)])
        if method == "ID":
            out_scores.append(score)
        elif method == "AVG":
            out_scores.append(sum(ws) / len(ws))
        elif method == "IOU_AVG":
            out_scores.append(sum(s * o for _, s, o in voters) / sum(o for _, _, o in voters))
        elif method == "TEMP_AVG":  # log-space temperature softmax over (p, 1 - p)
            temps = []
            for p in ws:
                logs = [math.log(v) if v > 0 else -math.inf for v in (p, 1 - p)]
                top = max(logs)
                e = [math.exp((v - top) / beta) for v in logs]
                temps.append(e[0] / sum(e))
            out_scores.append(sum(temps) / len(temps))
        elif method == "GENERALIZED_AVG":
            out_scores.append((sum(s ** beta for s in ws) / len(ws)) ** (1 / beta))
        else:
            out_scores.append(sum(ws) / len(ws) ** beta)
    return out_boxes, out_scores


@pytest.mark.parametrize("method", ["ID", "AVG", "IOU_AVG", "TEMP_AVG", "GENERALIZED_AVG", "QUASI_SUM"])
def test_box_voting_matches_detectron1_loop(method):
    boxes, scores = random_boxes(30, 7)
    keep, kept_scores = soft_nms(boxes, scores, "hard", iou_threshold=0.5, score_threshold=1e-4)
    voted, voted_scores = box_voting(boxes[keep], kept_scores, boxes, scores, 0.4, method, beta=2.0)
    ref_boxes, ref_scores = reference_box_voting(boxes[keep].tolist(), kept_scores.tolist(), boxes.tolist(),
                                                 scores.tolist(), 0.4, method, 2.0)
    torch.testing.assert_close(voted, torch.tensor(ref_boxes), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(voted_scores, torch.tensor(ref_scores), rtol=1e-5, atol=1e-6)
    assert (voted - boxes[keep]).abs().max() > 1e-3  # some box really moved


def test_box_voting_respects_classes():
    boxes = torch.tensor([[0.0, 0, 10, 10], [1, 0, 11, 10], [0, 1, 10, 11]])
    scores = torch.tensor([0.9, 0.8, 0.5])
    classes = torch.tensor([0, 1, 0])
    voted, _ = box_voting(boxes[:1], scores[:1], boxes, scores, 0.5, "ID", kept_classes=classes[:1], all_classes=classes)
    expected = (0.9 * boxes[0] + 0.5 * boxes[2]) / 1.4
    torch.testing.assert_close(voted[0], expected)
    with pytest.raises(ValueError, match="scoring_method"):
        box_voting(boxes, scores, boxes, scores, 0.5, "MEDIAN")
    with pytest.raises(ValueError, match="both kept_classes and all_classes"):
        box_voting(boxes, scores, boxes, scores, 0.5, kept_classes=classes)


@pytest.mark.parametrize("method", ["ID", "AVG", "IOU_AVG", "TEMP_AVG", "GENERALIZED_AVG", "QUASI_SUM"])
def test_box_voting_many_classes_matches_per_class_loop(method):
    boxes, scores = random_boxes(240, 8)
    classes = torch.randint(0, 40, (240,), generator=torch.Generator().manual_seed(1))
    keep, kept_scores = batched_soft_nms(boxes, scores, classes, "hard", iou_threshold=0.5, score_threshold=1e-4)
    # One more kept box, of a class absent from all_boxes but a copy of a box of the last class (the
    # nearest present one): it has no voters and stays as it is.
    last_class = classes.max()
    kept_boxes = torch.cat([boxes[keep], boxes[classes == last_class][:1]])
    kept_scores = torch.cat([kept_scores, torch.tensor([0.3])])
    kept_classes = torch.cat([classes[keep], (last_class + 1)[None]])
    voted, voted_scores = box_voting(kept_boxes, kept_scores, boxes, scores, 0.4, method, 2.0, kept_classes, classes)

    ref_boxes, ref_scores = kept_boxes.clone(), kept_scores.clone()
    for c in classes.unique().tolist():
        kept_rows, members = (kept_classes == c).nonzero().flatten(), (classes == c).nonzero().flatten()
        b, s = reference_box_voting(kept_boxes[kept_rows].tolist(), kept_scores[kept_rows].tolist(),
                                    boxes[members].tolist(), scores[members].tolist(), 0.4, method, 2.0)
        ref_boxes[kept_rows], ref_scores[kept_rows] = torch.tensor(b), torch.tensor(s)
    torch.testing.assert_close(voted, ref_boxes, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(voted_scores, ref_scores, rtol=1e-5, atol=1e-6)
    # The case needs cross-class overlaps that must not vote.
    class_blind, _ = box_voting(kept_boxes, kept_scores, boxes, scores, 0.4, method, 2.0)
    assert (class_blind - voted).abs().max() > 1e-3


def test_soft_postprocess_falls_back_to_hard_nms_while_tracing(monkeypatch, caplog):
    """Both NL-RoI ROI heads ask ``applies_soft_postprocess``: the greedy Soft-NMS loop does not export."""
    soft = PostprocessSettings(soft_nms=True)
    assert applies_soft_postprocess(soft) and not applies_soft_postprocess(PostprocessSettings())
    monkeypatch.setattr(torch.jit, "is_tracing", lambda: True)
    with caplog.at_level("WARNING", logger="nlroi_d2.inference"):
        assert not applies_soft_postprocess(soft)
    assert "tracing with hard NMS instead" in caplog.text


@pytest.mark.parametrize("scoring", ["ID", "AVG"])
def test_per_image_postprocess_matches_detectron1_order(scoring):
    """Threshold -> per-class Soft-NMS -> box voting of every kept box -> top k, one class at a time in
    loops; the model votes only the top k with ID scoring, which must not change the result."""
    num_proposals, num_classes, topk, thresh = 60, 3, 10, 0.05
    g = torch.Generator().manual_seed(2)
    objects, _ = random_boxes(num_proposals // 4, 5, size=80.0)
    boxes = objects.repeat_interleave(4, dim=0) + torch.randn(num_proposals, 4, generator=g)  # 4 proposals each
    per_class = (boxes[:, None, :] + torch.randn(num_proposals, num_classes, 4, generator=g)).clamp(0, 99)
    per_class[..., 2:] = torch.maximum(per_class[..., 2:], per_class[..., :2] + 1)
    probs = torch.softmax(torch.randn(num_proposals, num_classes + 1, generator=g) * 2, dim=1)
    settings = PostprocessSettings(soft_nms=True, soft_nms_method="linear", box_vote=True,
                                   box_vote_iou_threshold=0.5, box_vote_scoring_method=scoring)
    result, proposals = fast_rcnn_inference_single_image_soft(
        per_class.reshape(num_proposals, -1), probs, (100, 100), thresh, 0.3, topk, settings)

    expected = []  # (score, class, proposal, box)
    for c in range(num_classes):
        members = [r for r in range(num_proposals) if probs[r, c] > thresh]
        class_boxes, class_scores = per_class[members, c].tolist(), probs[members, c].tolist()
        kept, kept_scores = reference_soft_nms(class_boxes, class_scores, "linear", 0.5, 0.3, 1e-4)
        voted, voted_scores = reference_box_voting([class_boxes[k] for k in kept], kept_scores, class_boxes,
                                                   class_scores, 0.5, scoring, 1.0)
        expected += [(s, c, members[k], b) for k, b, s in zip(kept, voted, voted_scores)]
    expected = sorted(expected, key=lambda e: -e[0])[:topk]
    assert len(expected) == topk and len(result) == topk
    torch.testing.assert_close(result.scores, torch.tensor([e[0] for e in expected]), rtol=1e-5, atol=1e-6)
    assert result.pred_classes.tolist() == [e[1] for e in expected]
    assert proposals.tolist() == [e[2] for e in expected]
    voted = result.pred_boxes.tensor
    torch.testing.assert_close(voted, torch.tensor([e[3] for e in expected]), rtol=1e-5, atol=1e-4)
    assert (voted - per_class[proposals, result.pred_classes]).abs().max() > 1e-2  # the votes moved boxes
