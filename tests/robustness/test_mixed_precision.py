"""Every model trains and predicts under autocast (``SOLVER.AMP.ENABLED`` on a GPU; bfloat16 on the CPU here):
no dtype mismatch between half-precision predictions and fp32 targets or buffers."""
import pytest
import torch

from d2ext.testing import assert_prediction_fields, build_tiny_model, dataset_batch, train_step

from .test_edge_cases import MODELS, sized_cfg

# With the AdelaiDet keys BlendMask uses (Base-BlendMask.yaml): FCOS without its fp32 Scale layers.
CASES = {**{name: (name, []) for name in MODELS},
         "blendmask_without_fcos_scales": ("blendmask", ["MODEL.FCOS.USE_SCALE", False]),
         "solov2_relative_coord_terms": ("solov2", ["MODEL.SOLOV2.RELATIVE_COORD_TERMS", True])}


@pytest.mark.parametrize("case", list(CASES))
def test_train_step_and_inference_under_autocast(case):
    name, opts = CASES[case]
    cfg = sized_cfg(name, threshold=0.0, opts=opts)  # an untrained model detects something
    model = build_tiny_model(cfg)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = train_step(model, dataset_batch(cfg))
        assert all(torch.isfinite(torch.tensor(v)) for v in losses.values()), losses
        model.eval()
        inputs = dataset_batch(cfg, is_train=False)
        with torch.no_grad():
            outputs = model(inputs)
    assert len(outputs) == 2
    for inp, out in zip(inputs, outputs):
        instances = out["instances"]
        assert_prediction_fields(instances, inp["height"], inp["width"], masks=cfg.MODEL.MASK_ON)
        assert torch.isfinite(instances.scores).all() and torch.isfinite(instances.pred_boxes.tensor).all()
    assert sum(len(out["instances"]) for out in outputs) > 0, "the checks above need detections"
