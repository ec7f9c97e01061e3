"""The optimizers of ``d2ext.engine.Trainer``: Detectron2's SGD or AdamW (``SOLVER.OPTIMIZER``), with Detectron2's
parameter groups and gradient clipping, plus clipping of the whole model's gradient norm.

Detectron2's ``SOLVER.CLIP_GRADIENTS.CLIP_TYPE: "norm"`` clips each parameter's gradient on its own. mmdetection
clips the norm of all gradients together (the official RDSNet's ``grad_clip=dict(max_norm=35, norm_type=2)``,
mmdetection SOLOv2's ``clip_grad``): ``CLIP_TYPE: "full_model"`` (the name DETR's Detectron2 wrapper gave it) does
that.
"""
import torch
from detectron2.solver import build_optimizer as d2_build_optimizer
from detectron2.solver.build import get_default_optimizer_params, maybe_add_gradient_clipping

OPTIMIZERS = ("SGD", "AdamW")
FULL_MODEL = "full_model"


def _with_full_model_clipping(optimizer, max_norm, norm_type):
    """``optimizer`` whose ``step`` first clips the norm of all its parameters' gradients together to ``max_norm``
    (``torch.nn.utils.clip_grad_norm_``); the class is swapped in place, as Detectron2 does for its clipping."""

    class FullModelGradientClipping(type(optimizer)):
        def step(self, closure=None):
            params = [p for group in self.param_groups for p in group["params"]]
            torch.nn.utils.clip_grad_norm_(params, max_norm, norm_type)
            return super().step(closure)

    FullModelGradientClipping.__name__ = f"{type(optimizer).__name__}WithFullModelGradientClip"
    optimizer.__class__ = FullModelGradientClipping
    return optimizer


def build_optimizer(cfg, model):
    """``SOLVER.OPTIMIZER`` ("SGD": Detectron2's ``build_optimizer``; "AdamW": torch's with the same parameter
    groups and clipping) with ``SOLVER.CLIP_GRADIENTS`` (Detectron2's "value" / "norm", or "full_model")."""
    name = cfg.SOLVER.OPTIMIZER
    if name not in OPTIMIZERS:
        raise ValueError(f"SOLVER.OPTIMIZER must be one of {OPTIMIZERS}, got {name!r}")
    clipping = cfg.SOLVER.CLIP_GRADIENTS
    full_model = clipping.ENABLED and clipping.CLIP_TYPE == FULL_MODEL
    if full_model:
        if clipping.CLIP_VALUE <= 0:
            raise ValueError(f"SOLVER.CLIP_GRADIENTS.CLIP_VALUE must be > 0, got {clipping.CLIP_VALUE}")
        cfg = cfg.clone()  # Detectron2's builders know only its per-parameter types
        cfg.defrost()
        cfg.SOLVER.CLIP_GRADIENTS.ENABLED = False
    if name == "SGD":
        optimizer = d2_build_optimizer(cfg, model)
    else:
        params = get_default_optimizer_params(
            model,
            base_lr=cfg.SOLVER.BASE_LR,
            weight_decay_norm=cfg.SOLVER.WEIGHT_DECAY_NORM,
            bias_lr_factor=cfg.SOLVER.BIAS_LR_FACTOR,
            weight_decay_bias=cfg.SOLVER.WEIGHT_DECAY_BIAS,
        )
        optimizer = maybe_add_gradient_clipping(cfg, torch.optim.AdamW)(
            params, lr=cfg.SOLVER.BASE_LR, betas=tuple(cfg.SOLVER.BETAS), weight_decay=cfg.SOLVER.WEIGHT_DECAY,
        )
    if full_model:
        optimizer = _with_full_model_clipping(optimizer, clipping.CLIP_VALUE, clipping.NORM_TYPE)
    return optimizer
