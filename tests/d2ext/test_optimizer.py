"""``SOLVER.OPTIMIZER``: d2ext's Trainer builds Detectron2's SGD or AdamW with the same parameter groups."""
import pytest
import torch
from torch import nn

from d2ext.engine import Trainer, setup_cfg


def _model():
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))


def _weight_decay_of(optimizer, parameter):
    (group,) = [g for g in optimizer.param_groups if any(p is parameter for p in g["params"])]
    return group["weight_decay"]


def test_sgd_is_the_default():
    optimizer = Trainer.build_optimizer(setup_cfg(None), _model())
    assert isinstance(optimizer, torch.optim.SGD)


def test_adamw_uses_detectron2_parameter_groups():
    cfg = setup_cfg(None, ["SOLVER.OPTIMIZER", "AdamW", "SOLVER.BASE_LR", 0.003, "SOLVER.WEIGHT_DECAY", 0.05,
                           "SOLVER.BETAS", (0.8, 0.99)])
    model = _model()
    optimizer = Trainer.build_optimizer(cfg, model)
    assert isinstance(optimizer, torch.optim.AdamW)
    assert all(g["lr"] == 0.003 and g["betas"] == (0.8, 0.99) for g in optimizer.param_groups)
    # Detectron2's groups: no weight decay on norm layers (SOLVER.WEIGHT_DECAY_NORM = 0 by default).
    assert _weight_decay_of(optimizer, model[0].weight) == 0.05
    assert _weight_decay_of(optimizer, model[1].weight) == 0.0

    # One step of the built optimizer equals torch's AdamW step on the same parameter.
    reference = model[0].weight.detach().clone().requires_grad_()
    expected_opt = torch.optim.AdamW([reference], lr=0.003, betas=(0.8, 0.99), weight_decay=0.05)
    grad = torch.randn_like(reference)
    model[0].weight.grad, reference.grad = grad.clone(), grad.clone()
    optimizer.step()
    expected_opt.step()
    torch.testing.assert_close(model[0].weight.detach(), reference.detach())


def test_unknown_optimizer_names_the_key():
    cfg = setup_cfg(None, ["SOLVER.OPTIMIZER", "Adam"])
    with pytest.raises(ValueError, match="SOLVER.OPTIMIZER"):
        Trainer.build_optimizer(cfg, _model())


@pytest.mark.parametrize("optimizer_name", ["SGD", "AdamW"])
def test_full_model_clipping_scales_all_gradients_by_one_factor(optimizer_name):
    cfg = setup_cfg(None, ["SOLVER.OPTIMIZER", optimizer_name, "SOLVER.BASE_LR", 0.1, "SOLVER.WEIGHT_DECAY", 0.0,
                           "SOLVER.WEIGHT_DECAY_NORM", 0.0, "SOLVER.MOMENTUM", 0.0,
                           "SOLVER.CLIP_GRADIENTS.ENABLED", True, "SOLVER.CLIP_GRADIENTS.CLIP_TYPE", "full_model",
                           "SOLVER.CLIP_GRADIENTS.CLIP_VALUE", 1.0])
    model = _model()
    optimizer = Trainer.build_optimizer(cfg, model)
    assert isinstance(optimizer, torch.optim.SGD if optimizer_name == "SGD" else torch.optim.AdamW)
    params = list(model.parameters())
    grads = [torch.full_like(p, 3.0) for p in params]
    for p, g in zip(params, grads):
        p.grad = g.clone()
    total_norm = sum(float((g ** 2).sum()) for g in grads) ** 0.5
    optimizer.step()
    # Every gradient is scaled by max_norm / total norm, one factor for all (Detectron2's "norm" would
    # clip each parameter's gradient to norm 1 on its own, with a factor per parameter).
    for p, g in zip(params, grads):
        torch.testing.assert_close(p.grad, g * (1.0 / (total_norm + 1e-6)), rtol=1e-5, atol=1e-7)
    assert (sum(float((p.grad ** 2).sum()) for p in params) ** 0.5) == pytest.approx(1.0, rel=1e-4)


def test_full_model_clipping_needs_a_positive_clip_value():
    cfg = setup_cfg(None, ["SOLVER.CLIP_GRADIENTS.ENABLED", True, "SOLVER.CLIP_GRADIENTS.CLIP_TYPE", "full_model",
                           "SOLVER.CLIP_GRADIENTS.CLIP_VALUE", 0.0])
    with pytest.raises(ValueError, match="CLIP_VALUE"):
        Trainer.build_optimizer(cfg, _model())
