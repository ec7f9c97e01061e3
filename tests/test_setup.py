"""The environment the set-up promises: Detectron2 importable with its model zoo, pins effective, and
what a lite Detectron2 build lacks is never hit silently."""
import PIL
import pytest
import torch
from detectron2 import _C, model_zoo

from d2ext.evaluation import build_coco_evaluator, has_fast_coco_eval

LITE_BUILD = hasattr(_C, "MISSING_OPS")


def test_detectron2_imports_and_model_zoo_configs_are_installed():
    import detectron2.data  # noqa: F401  (fails with Pillow >= 10 on v0.6)
    import detectron2.modeling  # noqa: F401

    path = model_zoo.get_config_file("COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml")
    cfg = model_zoo.get_config("COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml")
    assert path.endswith(".yaml") and cfg.MODEL.MASK_ON


def test_pillow_has_what_detectron2_v06_uses():
    # v0.6 uses Image.LINEAR (removed in Pillow 10): constraints.txt pins Pillow<10.
    assert hasattr(PIL.Image, "LINEAR"), f"Pillow {PIL.__version__} lacks Image.LINEAR"
    from detectron2.data.transforms import ExtentTransform

    ExtentTransform((0, 0, 8, 8), (4, 4))  # its default interp argument is Image.LINEAR


def test_polygons_to_bitmask_of_empty_polygon_list_numpy2_trap():
    # v0.6 returns np.zeros(...).astype(np.bool) here, an AttributeError on NumPy 2.
    from detectron2.structures.masks import polygons_to_bitmask

    mask = polygons_to_bitmask([], 5, 7)
    assert mask.shape == (5, 7) and mask.dtype == bool and not mask.any()


def test_evaluator_uses_pycocotools_when_fast_cocoeval_is_missing(tmp_path):
    evaluator = build_coco_evaluator("synthetic_shapes_mini_val", output_dir=str(tmp_path))
    assert evaluator._use_fast_impl == has_fast_coco_eval()
    if LITE_BUILD:
        assert not has_fast_coco_eval()


@pytest.mark.skipif(not LITE_BUILD, reason="official Detectron2 build: its compiled ops exist")
def test_lite_build_names_the_missing_op():
    from detectron2.layers.rotated_boxes import pairwise_iou_rotated

    with pytest.raises(NotImplementedError, match="box_iou_rotated"):
        pairwise_iou_rotated(torch.zeros(1, 5), torch.zeros(1, 5))
    # Detectron2's DeformConv calls these on CUDA tensors (on CPU it uses torchvision's op).
    for op in ("deform_conv_forward", "modulated_deform_conv_forward", "roi_align_rotated_forward"):
        with pytest.raises(NotImplementedError, match=op):
            getattr(_C, op)(torch.zeros(1))
    assert _C.get_compiler_version() and not _C.has_cuda()


def test_unknown_config_key_is_an_error():
    from d2ext.engine import setup_cfg

    with pytest.raises((KeyError, AssertionError), match="MODEL.NOT_A_KEY"):
        setup_cfg(None, ["MODEL.NOT_A_KEY", "1"])


def test_evaluator_scores_ground_truth_as_perfect(tmp_path):
    """Predictions equal to the ground truth get AP 100: category ids, boxes and masks of the built-in
    data are mapped between the dataset, the model's 0-based classes and the COCO json correctly."""
    from detectron2.data import DatasetCatalog
    from detectron2.data.detection_utils import annotations_to_instances

    evaluator = build_coco_evaluator("synthetic_shapes_mini_val", output_dir=str(tmp_path))
    evaluator.reset()
    for record in DatasetCatalog.get("synthetic_shapes_mini_val"):
        gt = annotations_to_instances(record["annotations"], (record["height"], record["width"]),
                                      mask_format="bitmask")
        gt.pred_boxes, gt.pred_classes, gt.pred_masks = gt.gt_boxes, gt.gt_classes, gt.gt_masks.tensor
        gt.scores = torch.ones(len(gt))
        evaluator.process([{"image_id": record["image_id"]}], [{"instances": gt}])
    results = evaluator.evaluate()
    assert results["bbox"]["AP"] == pytest.approx(100.0)
    assert results["segm"]["AP"] == pytest.approx(100.0)
