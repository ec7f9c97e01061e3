"""``d2ext.layers.postprocess_full_image_masks``: chunked resizing must give what resizing every mask at
once gives, with detections whose box is empty after clipping dropped (and their masks with them)."""
import pytest
import torch
from detectron2.structures import Boxes, Instances

from d2ext.layers import postprocess_full_image_masks
from d2ext.testing import bilinear_resize_reference


def _results():
    """Five detections at a 10 x 15 input; the third box lies right of the image (empty once clipped)."""
    generator = torch.Generator().manual_seed(0)
    boxes = torch.tensor([[1.0, 2.0, 9.0, 8.0], [0.0, 0.0, 15.0, 10.0], [16.0, 1.0, 20.0, 5.0],
                          [3.0, 3.0, 4.0, 9.0], [5.0, 0.0, 14.0, 2.0]])
    return Instances((10, 15), pred_boxes=Boxes(boxes), scores=torch.arange(5.0),
                     pred_masks=torch.rand(5, 10, 15, generator=generator))


@pytest.mark.parametrize("chunk_size", [1, 2, 16])
def test_chunks_equal_resizing_all_masks_at_once(chunk_size):
    results = _results()
    out = postprocess_full_image_masks(results, 20, 45, 0.4, chunk_size=chunk_size)
    assert torch.equal(results.pred_boxes.tensor, _results().pred_boxes.tensor)  # the input is left as it was

    expected_boxes, expected_masks, expected_scores = [], [], []
    for box, mask, score in zip(results.pred_boxes.tensor, results.pred_masks, results.scores):
        x1, y1, x2, y2 = (min(max(float(v) * scale, 0.0), limit)
                          for v, scale, limit in zip(box, (3, 2, 3, 2), (45, 20, 45, 20)))
        if x2 > x1 and y2 > y1:
            expected_boxes.append([x1, y1, x2, y2])
            expected_masks.append(bilinear_resize_reference(mask, (20, 45)) > 0.4)
            expected_scores.append(float(score))
    assert expected_scores == [0.0, 1.0, 3.0, 4.0]  # the third detection is dropped
    assert out.image_size == (20, 45) and out.scores.tolist() == expected_scores
    assert torch.allclose(out.pred_boxes.tensor, torch.tensor(expected_boxes))
    assert out.pred_masks.dtype == torch.bool and torch.equal(out.pred_masks, torch.stack(expected_masks))


def test_without_masks_and_with_no_detections():
    results = _results()
    results.remove("pred_masks")
    assert not postprocess_full_image_masks(results, 20, 45).has("pred_masks")
    empty = postprocess_full_image_masks(_results()[:0], 20, 45)
    assert empty.pred_masks.shape == (0, 20, 45) and empty.pred_masks.dtype == torch.bool


def test_bad_chunk_size_is_an_error():
    with pytest.raises(ValueError, match="chunk_size must be >= 1, got 0"):
        postprocess_full_image_masks(_results(), 20, 45, chunk_size=0)
