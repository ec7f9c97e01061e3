"""MBRM on the models with full-image soft masks (adet_lite's CondInst and SOLO, ``MODEL.MBRM.ENABLED``):
the refinement hook of ``d2ext.layers.postprocess_full_image_masks``, and the models end to end against the
same models without MBRM and a reference that runs MBRM on the resized soft masks directly."""
import pytest
import torch
import torch.nn.functional as F
from detectron2.structures import Boxes, Instances

from d2ext.export import check_exportable
from d2ext.layers import mask_bounding_boxes, postprocess_full_image_masks
from d2ext.testing import (assert_prediction_fields, bilinear_resize_reference, build_tiny_model,
                           condinst_masks_at_input_size, config_path, dataset_batch, predict,
                           resized_detections_reference, tiny_cfg, train_step)
from rdsnet_d2 import MBRM

CONDINST = "quickstart/condinst_R18_synthetic.yaml"
CONDINST_WITH_MBRM = "quickstart/condinst_R18_synthetic_mbrm.yaml"
SOLO = "quickstart/solo_R18_FPN_synthetic.yaml"
SOLOV2 = "quickstart/solov2_R18_FPN_synthetic.yaml"
# Small models (as tests/adet_lite), every candidate kept; chunks of 3 detections.
CONDINST_OPTS = ["INPUT.MIN_SIZE_TEST", "96", "INPUT.MAX_SIZE_TEST", "144", "MODEL.FCOS.NUM_CLS_CONVS", "1",
                 "MODEL.FCOS.NUM_BOX_CONVS", "1", "MODEL.CONDINST.MASK_BRANCH.NUM_CONVS", "2",
                 "MODEL.FCOS.INFERENCE_TH_TEST", "0.0", "MODEL.FCOS.POST_NMS_TOPK_TEST", "20",
                 "MODEL.MBRM.MASK_CHUNK_SIZE", "3"]
SOLO_OPTS = ["INPUT.MIN_SIZE_TEST", "96", "INPUT.MAX_SIZE_TEST", "128", "MODEL.FPN.OUT_CHANNELS", "32",
             "MODEL.SOLO.INSTANCE_CHANNELS", "32", "MODEL.SOLO.NUM_INSTANCE_CONVS", "1", "MODEL.SOLO.SCORE_THR", "0.0",
             "MODEL.SOLO.MASK_THR", "0.4", "MODEL.SOLO.UPDATE_THR", "0.0", "MODEL.MBRM.MASK_CHUNK_SIZE", "3"]


# ------------------------------------------------------------------------------------------ the hook
def _input_size_results(num, seed=0):
    """Instances at a 10 x 15 input with soft (num, 10, 15) masks and boxes."""
    generator = torch.Generator().manual_seed(seed)
    boxes = torch.tensor([[1.0 + i, 2.0, 9.0 + i, 8.0] for i in range(num)]).view(num, 4)
    return Instances((10, 15), pred_boxes=Boxes(boxes), scores=torch.rand(num, generator=generator),
                     pred_masks=torch.rand(num, 10, 15, generator=generator))


def test_refine_hook_sees_output_size_soft_masks_in_chunks():
    calls = []

    def refine(soft, boxes):
        calls.append((soft.clone(), boxes.clone()))
        return boxes + soft.flatten(1).mean(dim=1, keepdim=True)  # depends on the soft masks

    plain = postprocess_full_image_masks(_input_size_results(5), 20, 30, 0.4)
    refined = postprocess_full_image_masks(_input_size_results(5), 20, 30, 0.4, refine_boxes=refine, chunk_size=2)
    assert [len(boxes) for _, boxes in calls] == [2, 2, 1]
    soft = torch.cat([s for s, _ in calls])
    resized = torch.stack([bilinear_resize_reference(mask, (20, 30)) for mask in _input_size_results(5).pred_masks])
    torch.testing.assert_close(soft, resized)  # the soft masks at the output size, before thresholding
    assert torch.equal(torch.cat([b for _, b in calls]), plain.pred_boxes.tensor)  # the rescaled boxes
    assert torch.equal(refined.pred_masks, plain.pred_masks) and torch.equal(plain.pred_masks, resized > 0.4)
    torch.testing.assert_close(refined.pred_boxes.tensor,
                               plain.pred_boxes.tensor + resized.flatten(1).mean(dim=1)[:, None])
    assert torch.equal(refined.scores, plain.scores)


def test_refine_hook_without_detections_and_errors():
    def refine(soft, boxes):
        raise AssertionError("not called without detections")

    out = postprocess_full_image_masks(_input_size_results(0), 20, 30, refine_boxes=refine)
    assert out.pred_masks.shape == (0, 20, 30) and out.pred_masks.dtype == torch.bool
    assert out.pred_boxes.tensor.shape == (0, 4)
    no_masks = _input_size_results(2)
    no_masks.remove("pred_masks")
    with pytest.raises(ValueError, match="pred_masks"):
        postprocess_full_image_masks(no_masks, 20, 30, refine_boxes=refine)
    with pytest.raises(ValueError, match="chunk_size"):
        postprocess_full_image_masks(_input_size_results(2), 20, 30, refine_boxes=refine, chunk_size=0)


# ------------------------------------------------------------------------------------------ the models
def _outputs(model, inputs):
    with torch.no_grad():
        return [out["instances"] for out in model.eval()(inputs)]


def _assert_same_but_boxes(out, exp):
    assert set(out.get_fields()) == set(exp.get_fields())
    for field in ("scores", "pred_classes", "pred_masks"):
        assert torch.equal(out.get(field), exp.get(field)), field


def _with_weights_of(plain, model):
    incompatible = model.load_state_dict(plain.state_dict(), strict=False)
    assert incompatible.missing_keys == ["mbrm.weight", "mbrm.bias"] and not incompatible.unexpected_keys
    assert isinstance(model.mbrm, MBRM) and not any(p.requires_grad for p in model.mbrm.parameters())
    return model


def test_condinst_without_mbrm_outputs_the_resized_masks_and_rescaled_boxes():
    """MBRM off: the post-processing is the previous one (one resize of all masks, threshold 0.5)."""
    cfg = tiny_cfg(config_path(CONDINST), CONDINST_OPTS)
    model = build_tiny_model(cfg).eval()
    inputs = dataset_batch(cfg, is_train=False)
    with torch.no_grad():
        raw = model.inference(inputs, do_postprocess=False)
    for inp, res, out in zip(inputs, raw, _outputs(model, inputs)):
        res = condinst_masks_at_input_size(res, model.mask_head.mask_out_stride)
        boxes, soft = resized_detections_reference(res, inp["height"], inp["width"])
        assert len(out) > 0
        assert torch.equal(out.pred_masks, soft > 0.5) and torch.equal(out.pred_boxes.tensor, boxes)


def _assert_mbrm_refines_boxes(plain, model, inputs, expected_boxes):
    """``model`` (MBRM on, ``plain``'s weights) gives ``plain``'s outputs but the boxes, which equal
    ``expected_boxes(raw instances, image's inputs, plain's output)`` for every image; some boxes move."""
    with torch.no_grad():
        raw = plain.eval().inference(inputs, do_postprocess=False)
    moved = 0
    for inp, res, exp, out in zip(inputs, raw, _outputs(plain, inputs), _outputs(model, inputs)):
        _assert_same_but_boxes(out, exp)
        assert len(out) > 0
        assert torch.equal(out.pred_boxes.tensor, expected_boxes(res, inp, exp))
        moved += int((out.pred_boxes.tensor != exp.pred_boxes.tensor).sum())
    assert moved > 0


def test_condinst_with_mbrm_end_to_end():
    plain = build_tiny_model(tiny_cfg(config_path(CONDINST), CONDINST_OPTS))
    model = _with_weights_of(plain, build_tiny_model(tiny_cfg(config_path(CONDINST_WITH_MBRM), CONDINST_OPTS)))

    def per_detection_mbrm(raw, inputs, plain_output):
        raw = condinst_masks_at_input_size(raw, plain.mask_head.mask_out_stride)
        boxes, soft = resized_detections_reference(raw, inputs["height"], inputs["width"])
        assert torch.equal(boxes, plain_output.pred_boxes.tensor)
        return torch.cat([model.mbrm(soft[i: i + 1], boxes[i: i + 1]) for i in range(len(boxes))])

    inputs = dataset_batch(tiny_cfg(config_path(CONDINST), CONDINST_OPTS), is_train=False)
    _assert_mbrm_refines_boxes(plain, model, inputs, per_detection_mbrm)


def test_solo_with_mbrm_end_to_end():
    """SOLO's boxes are those of its final masks: MBRM refines those."""
    plain = build_tiny_model(tiny_cfg(config_path(SOLO), SOLO_OPTS))
    with torch.no_grad():  # random weights give flat masks (the prior, 0.01): sharpened, they have edges
        for name, parameter in plain.mask_branch.predictors.named_parameters():
            parameter.copy_(parameter * 30 if name.endswith("weight") else torch.zeros_like(parameter))
    cfg = tiny_cfg(config_path(SOLO), SOLO_OPTS + ["MODEL.MBRM.ENABLED", "True"])
    model = _with_weights_of(plain, build_tiny_model(cfg))

    def mbrm_of_mask_boxes(raw, inputs, plain_output):
        # SOLO's raw masks are at stride 4 of the padded input: the reference upsamples them to it and crops.
        height, width = raw.image_size
        padded = F.interpolate(raw.pred_masks[:, None], scale_factor=4, mode="bilinear", align_corners=False)
        raw = Instances(raw.image_size, pred_boxes=raw.pred_boxes, pred_masks=padded[:, 0, :height, :width])
        _, soft = resized_detections_reference(raw, inputs["height"], inputs["width"])
        soft = soft[(soft > 0.4).flatten(1).any(dim=1)]  # SOLO drops the empty masks
        assert torch.equal(plain_output.pred_boxes.tensor, mask_bounding_boxes(soft > 0.4).tensor)
        return model.mbrm(soft, plain_output.pred_boxes.tensor)

    inputs = dataset_batch(tiny_cfg(config_path(SOLO), SOLO_OPTS), is_train=False)
    _assert_mbrm_refines_boxes(plain, model, inputs, mbrm_of_mask_boxes)


def test_condinst_with_mbrm_without_detections_trains_and_does_not_export():
    cfg = tiny_cfg(config_path(CONDINST_WITH_MBRM), CONDINST_OPTS + ["MODEL.FCOS.INFERENCE_TH_TEST", "1.0"])
    model = build_tiny_model(cfg)
    (inp,), (instances,) = predict(model, cfg)
    assert_prediction_fields(instances, inp["height"], inp["width"])
    assert len(instances) == 0
    with pytest.raises(ValueError, match="MBRM.ENABLED False"):
        check_exportable(model)
    # MBRM is frozen: training with the switch on trains CondInst alone
    losses = train_step(model, dataset_batch(cfg, indices=(0,)))
    assert losses and all(p.grad is None for p in model.mbrm.parameters())
    assert model.controller.weight.grad is not None


@pytest.mark.parametrize("config", [CONDINST_WITH_MBRM, SOLO, SOLOV2])
def test_mbrm_config_errors(config):
    """Every model with full-image masks reads the switch (BlendMask: test_mbrm_postprocess.py)."""
    opts = ["MODEL.MBRM.ENABLED", "True"]
    with pytest.raises(ValueError, match="MBRM.ENABLED .* set MODEL.MASK_ON True"):
        build_tiny_model(tiny_cfg(config_path(config), opts + ["MODEL.MASK_ON", "False"]))


def test_models_build_without_the_mbrm_keys():
    """adet_lite's keys alone (no ``rdsnet_d2.add_rdsnet_config``): no MODEL.MBRM, no MBRM."""
    cfg = tiny_cfg(config_path(CONDINST), CONDINST_OPTS, freeze=False)
    del cfg.MODEL["MBRM"]
    assert build_tiny_model(cfg).mbrm is None
