"""Every model trains and predicts under autocast (``SOLVER.AMP.ENABLED`` on a GPU; bfloat16 on the CPU here):
no dtype mismatch between half-precision predictions and fp32 targets or buffers."""
import pytest
import torch

from d2ext.testing import build_tiny_model, dataset_batch, train_step

from .test_user_errors import MODELS, model_cfg

# With the AdelaiDet keys BlendMask uses (Base-BlendMask.yaml): FCOS without its fp32 Scale layers.
CASES = {**{name: (name, []) for name in MODELS},
         "blendmask_without_fcos_scales": ("blendmask", ["MODEL.FCOS.USE_SCALE", False])}


@pytest.mark.parametrize("case", list(CASES))
def test_train_step_and_inference_under_autocast(case):
    name, opts = CASES[case]
    cfg = model_cfg(name, opts)
    model = build_tiny_model(cfg)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = train_step(model, dataset_batch(cfg))
        assert all(torch.isfinite(torch.tensor(v)) for v in losses.values()), losses
        model.eval()
        with torch.no_grad():
            outputs = model(dataset_batch(cfg, is_train=False))
    assert len(outputs) == 2 and all("instances" in o for o in outputs)
