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
