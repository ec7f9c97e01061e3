"""benchmarks/match_quality.py: per-instance best IoU and class of the top-scoring match against loops, and
the area errors of a hand-made pair of masks."""
import numpy as np

from d2ext.testing import load_script

match_quality = load_script("benchmarks/match_quality.py")


def _reference(iou, gt_classes, det_classes, det_scores):
    best, best_det, right = [], [], []
    for g in range(len(gt_classes)):
        best.append(max([iou[d][g] for d in range(len(det_classes))], default=0.0))
        best_det.append(next((d for d in range(len(det_classes)) if iou[d][g] == best[-1]), -1))
        top = None
        for d in range(len(det_classes)):
            if iou[d][g] >= 0.5 and (top is None or det_scores[d] > det_scores[top]):
                top = d
        right.append(None if top is None else det_classes[top] == gt_classes[g])
    return best, best_det, right


def test_image_match_quality_matches_loops():
    rng = np.random.default_rng(0)
    for num_det, num_gt in ((6, 4), (1, 3), (5, 1)):
        iou = rng.uniform(0, 1, size=(num_det, num_gt))
        gt_classes = rng.integers(1, 4, size=num_gt).tolist()
        det_classes = rng.integers(1, 4, size=num_det).tolist()
        det_scores = rng.uniform(0, 1, size=num_det).tolist()
        best, best_det, right = match_quality.image_match_quality(iou, gt_classes, det_classes, det_scores)
        ref_best, ref_best_det, ref_right = _reference(iou, gt_classes, det_classes, det_scores)
        assert np.allclose(best, ref_best) and best_det.tolist() == ref_best_det and right == ref_right


def test_top_scoring_match_decides_the_class_and_no_detection_gives_none():
    # Instance 0 (class 1): the better-IoU detection has the wrong class but the lower score.
    iou = [[0.9, 0.0], [0.6, 0.3]]
    best, best_det, right = match_quality.image_match_quality(iou, [1, 2], [2, 1], [0.2, 0.8])
    assert best.tolist() == [0.9, 0.3] and best_det.tolist() == [0, 1] and right == [True, None]
    best, best_det, right = match_quality.image_match_quality([], [1, 2], [], [])
    assert best.tolist() == [0.0, 0.0] and best_det.tolist() == [-1, -1] and right == [None, None]


def test_area_errors_of_a_shifted_square():
    gt = np.zeros((10, 10), bool)
    gt[2:6, 2:6] = True  # 16 px
    pred = np.zeros((10, 10), bool)
    pred[3:7, 2:6] = True  # one row down: 4 px outside, 4 px of gt missed
    pred[0, 0] = True  # and one stray pixel
    others = np.zeros((10, 10), bool)
    others[6:9, 4:9] = True  # a neighbour below: 2 of the 4 px outside lie on it
    outside, on_others, missed = match_quality.area_errors(pred, gt, others)
    assert (outside, on_others, missed) == (5 / 16, 2 / 16, 4 / 16)


def test_same_class_neighbour_needs_overlapping_boxes_of_the_same_class():
    boxes = [
        [0, 0, 10, 10],   # overlaps box 1 (same class)
        [5, 5, 10, 10],
        [10, 0, 5, 5],    # touches box 0's edge only: no area in common
        [20, 20, 10, 10],  # overlaps box 4, which has another class
        [25, 25, 10, 10],
    ]
    classes = [1, 1, 1, 2, 3]
    expected = []
    for i, (x, y, w, h) in enumerate(boxes):
        expected.append(any(
            j != i and classes[j] == classes[i] and min(x + w, u + s) > max(x, u) and min(y + h, v + t) > max(y, v)
            for j, (u, v, s, t) in enumerate(boxes)))
    assert expected == [True, True, False, False, False]
    assert match_quality.has_same_class_neighbour(boxes, classes).tolist() == expected
    assert match_quality.has_same_class_neighbour([], []).tolist() == []
