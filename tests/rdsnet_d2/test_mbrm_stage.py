"""The MBRM training stage (``MODEL.MBRM.TRAIN``) on the models other than RDSNet (its own stage:
test_rdsnet_model.py): only MBRM trains, on the boxes and soft-mask profiles that each model's
post-processing refines at the input size; the loss against a reference that pastes or resizes each
detection's mask and matches GT boxes by a loop; the loss falls; the trained MBRM loads into the model
that refines with it."""
import copy
import os

import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling.postprocessing import detector_postprocess

from d2ext.testing import (box_iou_reference, build_tiny_model, condinst_masks_at_input_size, config_path,
                           dataset_batch, resized_detections_reference, soft_paste_reference, tiny_cfg, train_step,
                           visible_blendmask_masks)
from rdsnet_d2 import MBRM

MASK_RCNN = "quickstart/mask_rcnn_R18_FPN_mbrm_synthetic.yaml"
CONDINST = "quickstart/condinst_R18_synthetic_mbrm.yaml"
BLENDMASK = "quickstart/blendmask_R18_synthetic_mbrm.yaml"
SOLO = "quickstart/solo_R18_FPN_synthetic.yaml"
SOLOV2 = "quickstart/solov2_R18_FPN_synthetic.yaml"
# Small models whose every candidate is kept (as test_mbrm_postprocess.py / test_mbrm_one_stage.py); a zero
# kernel (s = 3) so that the loss starts from the prior alone; a low IoU so that random detections match.
TRAIN_IOU = 0.2
STAGE = ["MODEL.MBRM.TRAIN", "True", "MODEL.MBRM.KERNEL_HALF_SIZE", "3", "MODEL.MBRM.TRAIN_IOU", str(TRAIN_IOU)]
OPTS = {
    MASK_RCNN: ["INPUT.MIN_SIZE_TEST", "96", "INPUT.MAX_SIZE_TEST", "128", "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0",
                "TEST.DETECTIONS_PER_IMAGE", "20", "MODEL.MBRM.MASK_CHUNK_SIZE", "7"],
    CONDINST: ["INPUT.MIN_SIZE_TEST", "96", "INPUT.MAX_SIZE_TEST", "144", "MODEL.FCOS.NUM_CLS_CONVS", "1",
               "MODEL.FCOS.NUM_BOX_CONVS", "1", "MODEL.CONDINST.MASK_BRANCH.NUM_CONVS", "2",
               "MODEL.FCOS.INFERENCE_TH_TEST", "0.0", "MODEL.FCOS.POST_NMS_TOPK_TEST", "20",
               "MODEL.MBRM.MASK_CHUNK_SIZE", "3"],
    BLENDMASK: ["INPUT.MIN_SIZE_TEST", "96", "INPUT.MAX_SIZE_TEST", "144", "MODEL.FCOS.NUM_CLS_CONVS", "1",
                "MODEL.FCOS.NUM_BOX_CONVS", "1", "MODEL.BASIS_MODULE.NUM_CONVS", "1",
                "MODEL.BASIS_MODULE.CONVS_DIM", "32", "MODEL.FCOS.INFERENCE_TH_TEST", "0.0"],
    SOLO: ["INPUT.MIN_SIZE_TEST", "96", "INPUT.MAX_SIZE_TEST", "128", "MODEL.FPN.OUT_CHANNELS", "32",
           "MODEL.SOLO.INSTANCE_CHANNELS", "32", "MODEL.SOLO.NUM_INSTANCE_CONVS", "1", "MODEL.SOLO.SCORE_THR", "0.0",
           "MODEL.SOLO.MASK_THR", "0.4", "MODEL.SOLO.UPDATE_THR", "0.0", "MODEL.MBRM.MASK_CHUNK_SIZE", "3"],
}
OPTS[SOLOV2] = [o.replace("MODEL.SOLO.", "MODEL.SOLOV2.") for o in OPTS[SOLO]] + [
    "MODEL.SOLOV2.INSTANCE_IN_CHANNELS", "32", "MODEL.SOLOV2.MASK_IN_CHANNELS", "32", "MODEL.SOLOV2.NUM_KERNELS", "32",
    "MODEL.SOLOV2.NUM_MASKS", "32"]


def _stage_model(config, extra=()):
    """The model of ``config`` in the MBRM stage, with masks that random weights leave visible."""
    model = build_tiny_model(tiny_cfg(config_path(config), OPTS[config] + STAGE + list(extra)))
    if config == BLENDMASK:
        visible_blendmask_masks(model)
    if config in (CONDINST, BLENDMASK):  # boxes of about the objects' size (random weights regress ~0)
        torch.nn.init.constant_(model.proposal_generator.fcos_head.bbox_pred.bias, 3.0)
    if config == SOLO:  # random weights give flat masks (the prior, 0.01): sharpened, they have edges
        with torch.no_grad():
            for name, parameter in model.mask_branch.predictors.named_parameters():
                parameter.copy_(parameter * 30 if name.endswith("weight") else torch.zeros_like(parameter))
    return model


def _batch(config):
    # Training inputs at the small test size (the training resize is the test one: dataset_batch).
    return dataset_batch(tiny_cfg(config_path(config), OPTS[config]), indices=(0, 1))


@pytest.mark.parametrize("config", [MASK_RCNN, CONDINST, BLENDMASK, SOLO, SOLOV2])
def test_stage_trains_mbrm_alone(config):
    model = _stage_model(config)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["mbrm.weight", "mbrm.bias"]
    frozen = copy.deepcopy({k: v for k, v in model.state_dict().items() if not k.startswith("mbrm.")})
    kernel = model.mbrm.weight.detach().clone()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    losses = train_step(model, _batch(config), optimizer)
    assert list(losses) == ["loss_mbrm"] and losses["loss_mbrm"] > 0  # detections matched GT boxes
    assert model.training and model.backbone.training  # the frozen inference restored the mode
    assert not torch.equal(model.mbrm.weight, kernel)
    for key, value in model.state_dict().items():
        if not key.startswith("mbrm."):
            assert torch.equal(value, frozen[key]), key


def _reference_loss(model, batch, soft_masks_of):
    """The stage's loss computed by hand: the model's raw detections of each image, each one's soft mask at
    the input size (``soft_masks_of(raw, input) -> boxes (N, 4), masks (N, H, W)``), GT matched by a loop over
    IoUs, the MBRM loss of each image's matched detections weighted by their number."""
    model.eval()
    total, count = 0.0, 0
    for inp in batch:
        with torch.no_grad():  # one image at a time, as at test time: padded alone
            (result,) = model.inference([inp], do_postprocess=False)
        boxes, soft = soft_masks_of(result, inp)
        gt_boxes = inp["instances"].gt_boxes.tensor
        matched, targets = [], []
        for i, box in enumerate(boxes.tolist()):
            ious = [box_iou_reference(box, gt) for gt in gt_boxes.tolist()]
            best = max(range(len(ious)), key=lambda j: ious[j])  # the first of equal IoUs, as argmax
            if ious[best] >= TRAIN_IOU:
                matched.append(i)
                targets.append(gt_boxes[best])
        if matched:
            x_profiles, y_profiles = MBRM.profiles(soft[matched])
            loss = model.mbrm.loss(x_profiles, y_profiles, boxes[matched], torch.stack(targets))
            total, count = total + float(loss) * len(matched), count + len(matched)
    assert count > 0
    return total / count


def test_stage_loss_on_pasted_roi_masks_equals_reference():
    """Mask R-CNN: each RoI mask pasted over the whole input by Detectron2's soft pasting."""
    model = _stage_model(MASK_RCNN)
    batch = _batch(MASK_RCNN)

    def pasted(result, inp):
        result.roi_masks = result.pred_masks[:, 0]
        height, width = inp["image"].shape[-2:]
        result = detector_postprocess(result, height, width)
        boxes = result.pred_boxes.tensor
        return boxes, torch.cat([soft_paste_reference(result.roi_masks[i: i + 1], boxes[i: i + 1], (height, width))
                                 for i in range(len(boxes))])

    losses = train_step(model, batch)
    assert losses["loss_mbrm"] == pytest.approx(_reference_loss(model, batch, pasted), rel=1e-5)


def test_stage_loss_on_full_image_masks_equals_reference():
    """CondInst: each detection's mask upsampled to the padded input, cropped, resized to the input size."""
    model = _stage_model(CONDINST)
    batch = _batch(CONDINST)

    def resized(result, inp):
        result = condinst_masks_at_input_size(result, model.mask_head.mask_out_stride)
        return resized_detections_reference(result, *inp["image"].shape[-2:])

    losses = train_step(model, batch)
    assert losses["loss_mbrm"] == pytest.approx(_reference_loss(model, batch, resized), rel=1e-5)


def test_stage_lowers_its_loss_and_the_trained_mbrm_loads_for_inference(tmp_path):
    model = _stage_model(MASK_RCNN)
    batch = _batch(MASK_RCNN)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.05)
    history = [train_step(model, batch, optimizer)["loss_mbrm"] for _ in range(6)]
    assert history[-1] < 0.97 * history[0], history
    DetectionCheckpointer(model, save_dir=str(tmp_path)).save("stage")
    # the refining model (MBRM.ENABLED, not the stage) of another initialisation loads the stage's weights
    cfg = tiny_cfg(config_path(MASK_RCNN), OPTS[MASK_RCNN] + ["MODEL.MBRM.KERNEL_HALF_SIZE", "3"])
    refining = build_tiny_model(cfg, seed=1)
    assert not any(p.requires_grad for p in refining.mbrm.parameters())
    DetectionCheckpointer(refining).load(os.path.join(str(tmp_path), "stage.pth"))
    assert torch.equal(refining.mbrm.weight, model.mbrm.weight) and torch.equal(refining.mbrm.bias, model.mbrm.bias)
    inputs = dataset_batch(cfg, is_train=False)
    with torch.no_grad():
        expected, loaded = model.eval()(inputs), refining.eval()(inputs)
    for a, b in zip(expected, loaded):
        assert torch.equal(a["instances"].pred_boxes.tensor, b["instances"].pred_boxes.tensor)


def test_stage_names_inputs_without_annotations():
    model = _stage_model(CONDINST)
    batch = dataset_batch(tiny_cfg(config_path(CONDINST), OPTS[CONDINST]), is_train=False)
    with pytest.raises(ValueError, match=r"MBRM training stage \(MODEL.MBRM.TRAIN\) needs 'instances'"):
        train_step(model, batch)


def test_stage_without_detections_gives_a_connected_zero():
    """No detection (score threshold 1) matches nothing: loss 0, still a graph to MBRM's parameters."""
    model = _stage_model(CONDINST, ["MODEL.FCOS.INFERENCE_TH_TEST", "1.0"])
    losses = train_step(model, _batch(CONDINST))
    assert losses == {"loss_mbrm": 0.0}
    assert all(p.grad is not None and not p.grad.any() for p in model.mbrm.parameters())
