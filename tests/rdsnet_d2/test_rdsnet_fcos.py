"""RDSNet with FCOS as its object stream (RDSNetFCOS) on CPU: the positives the mask side trains, train
step + inference, empty images, zero detections, checkpoint round trip, overfitting, the MBRM stage."""
import pytest
import torch
from detectron2.structures import Boxes, Instances

from d2ext.testing import (
    assert_checkpoint_round_trip, assert_losses_fall, assert_masks_inside_expanded_boxes, assert_prediction_fields,
    build_tiny_model, config_path, dataset_batch, loss_history, predict, tiny_cfg, train_step,
)

CONFIG = config_path("quickstart/rdsnet_fcos_R18_synthetic.yaml")
SMALL = ["INPUT.MIN_SIZE_TEST", 96, "INPUT.MAX_SIZE_TEST", 144, "MODEL.FCOS.NUM_CLS_CONVS", 1,
         "MODEL.FCOS.NUM_BOX_CONVS", 1, "MODEL.RDSNET.PIXEL_CONV_DIM", 32]
ALL_DETECTIONS = ["MODEL.FCOS.INFERENCE_TH_TEST", 0.0, "MODEL.FCOS.POST_NMS_TOPK_TEST", 20,
                  "MODEL.RDSNET.MASK_CHUNK_SIZE", 7]


def _cfg(*opts):
    return tiny_cfg(CONFIG, SMALL + list(opts))


def test_mask_side_gets_each_positives_image_and_own_gt_index(monkeypatch):
    """FCOS numbers GT instances across the batch; each positive reaches the mask side with its image's
    own GT index and its location's representation (a loop over the positives as the reference)."""
    cfg = _cfg("MODEL.RDSNET.MASK_MIN_AREA", 0)
    model = build_tiny_model(cfg)
    batch = dataset_batch(cfg, indices=(0, 1, 2))
    seen = {}
    fcos_losses = model.proposal_generator.losses

    def recording_losses(predictions, gt_instances):
        losses, positives = fcos_losses(predictions, gt_instances)
        seen["positives"] = positives
        return losses, positives

    def recording_mask_targets(padded_size, mask_size, positive_images, positive_gt, gt_instances):
        seen["images"], seen["gt"], seen["gt_instances"] = positive_images, positive_gt, gt_instances
        return torch.zeros(0, dtype=torch.long), torch.zeros((0, *mask_size), dtype=torch.long), torch.zeros(0, 4)

    monkeypatch.setattr(model.proposal_generator, "losses", recording_losses)
    monkeypatch.setattr(model, "mask_targets", recording_mask_targets)
    train_step(model, batch)
    positives, gt_instances = seen["positives"], seen["gt_instances"]
    assert len(positives) > 0 and len({int(i) for i in positives.im_inds}) == 3
    sizes = [len(gt) for gt in gt_instances]
    for k in range(len(positives)):
        image, global_index = int(positives.im_inds[k]), int(positives.gt_inds[k])
        local = global_index - sum(sizes[:image])
        assert int(seen["images"][k]) == image and int(seen["gt"][k]) == local
        assert 0 <= local < sizes[image]
        # the box FCOS regresses to from this location (distances in stride units) is the mask side's GT box
        (x, y), stride = positives.locations[k].tolist(), model.proposal_generator.strides[positives.fpn_levels[k]]
        left, top, right, bottom = (positives.reg_targets[k] * stride).tolist()
        regressed = torch.tensor([x - left, y - top, x + right, y + bottom])
        torch.testing.assert_close(regressed, gt_instances[image].gt_boxes.tensor[local], rtol=0, atol=1e-3)


def test_train_step_and_inference():
    cfg = _cfg()
    model = build_tiny_model(cfg)
    losses = train_step(model, dataset_batch(cfg))
    assert set(losses) == {"loss_fcos_cls", "loss_fcos_loc", "loss_fcos_ctr", "loss_mask"}
    assert all(torch.isfinite(torch.tensor(v)) for v in losses.values()) and losses["loss_mask"] > 0
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)

    cfg = _cfg(*ALL_DETECTIONS)
    inputs, instances = predict(build_tiny_model(cfg), cfg, indices=(0, 1))
    for inp, inst in zip(inputs, instances):
        assert_prediction_fields(inst, inp["height"], inp["width"])
        assert 0 < len(inst) <= 20 and inst.pred_classes.max() < 4
        assert_masks_inside_expanded_boxes(inst, 0.1)  # the test crop (MODEL.RDSNET.TEST_CROP_EXPAND)


def test_image_without_annotations_and_zero_detections():
    cfg = _cfg()
    model = build_tiny_model(cfg)
    batch = dataset_batch(cfg, indices=(0, 1))
    image = batch[1]["instances"]
    batch[1]["instances"] = Instances(image.image_size, gt_boxes=Boxes(torch.zeros(0, 4)),
                                      gt_classes=torch.zeros(0, dtype=torch.long), gt_masks=image.gt_masks[[]])
    assert all(torch.isfinite(torch.tensor(v)) for v in train_step(model, batch).values())
    losses = train_step(model, batch[1:])  # only the empty image: no positive, no mask
    assert losses["loss_mask"] == 0.0 and losses["loss_fcos_loc"] == 0.0
    assert all(p.grad is not None for p in model.parameters())

    cfg = _cfg("MODEL.FCOS.INFERENCE_TH_TEST", 1.0)
    (inp,), (inst,) = predict(build_tiny_model(cfg), cfg)
    assert len(inst) == 0
    assert_prediction_fields(inst, inp["height"], inp["width"])


def test_bad_config_is_a_clear_error():
    with pytest.raises(ValueError, match="MASK_ON"):
        build_tiny_model(_cfg("MODEL.MASK_ON", False))
    with pytest.raises(ValueError, match="PIXEL_IN_FEATURES"):
        build_tiny_model(_cfg("MODEL.RDSNET.PIXEL_IN_FEATURES", ["p2", "p3", "p4"]))
    with pytest.raises(ValueError, match="PROPOSAL_GENERATOR"):
        build_tiny_model(_cfg("MODEL.PROPOSAL_GENERATOR.NAME", "RPN"))
    # A P2 that neither FCOS (P3-P7) nor the pixel stream (P3-P5) reads would get no gradient (DDP fails).
    with pytest.raises(ValueError, match=r"computes \['p2'\], which no head reads .*MODEL.FCOS.TOP_LEVELS"):
        build_tiny_model(_cfg("MODEL.RESNETS.OUT_FEATURES", ["res2", "res3", "res4", "res5"],
                              "MODEL.FPN.IN_FEATURES", ["res2", "res3", "res4", "res5"]))


def test_checkpoint_round_trip(tmp_path):
    assert_checkpoint_round_trip(_cfg(*ALL_DETECTIONS), str(tmp_path), fields=("scores", "pred_boxes", "pred_masks"))


def test_box_coordinate_terms_train_predict_and_round_trip(tmp_path):
    """MODEL.RDSNET.BOX_COORD_TERMS: 4 more values per slot, trained through loss_mask, used at test."""
    cfg = _cfg("MODEL.RDSNET.BOX_COORD_TERMS", True)
    model = build_tiny_model(cfg)
    assert model.rep_conv.out_channels == 2 * (cfg.MODEL.RDSNET.REP_DIM + 4)
    losses = train_step(model, dataset_batch(cfg))
    assert losses["loss_mask"] > 0 and model.rep_conv.weight.grad.abs().sum() > 0
    cfg = _cfg(*ALL_DETECTIONS, "MODEL.RDSNET.BOX_COORD_TERMS", True)
    inputs, instances = predict(build_tiny_model(cfg), cfg, indices=(0, 1))
    for inp, inst in zip(inputs, instances):
        assert_prediction_fields(inst, inp["height"], inp["width"])
        assert 0 < len(inst) <= 20
    assert_checkpoint_round_trip(cfg, str(tmp_path), fields=("scores", "pred_boxes", "pred_masks"))


def test_overfit_losses_fall():
    cfg = _cfg()
    history = loss_history(build_tiny_model(cfg), dataset_batch(cfg, indices=(0, 1)), 25, lr=0.01)
    assert_losses_fall(history, 0.5, loss_mask=0.7)


def test_mbrm_stage_trains_only_mbrm():
    cfg = _cfg(*ALL_DETECTIONS, "MODEL.MBRM.TRAIN", True, "MODEL.MBRM.ENABLED", True, "MODEL.MBRM.TRAIN_IOU", 0.0)
    model = build_tiny_model(cfg)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(name.startswith("mbrm.") for name in trainable)
    losses = train_step(model, dataset_batch(cfg))
    assert set(losses) == {"loss_mbrm"} and torch.isfinite(torch.tensor(losses["loss_mbrm"]))
    assert model.training and model.proposal_generator.training  # the stage's frozen inference restores the mode
