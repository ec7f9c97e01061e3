"""One config for every method of this repository."""
import logging

import torch
from detectron2.config import get_cfg as d2_get_cfg

logger = logging.getLogger(__name__)


def add_d2ext_config(cfg):
    """Keys of the shared training glue (``d2ext.engine.Trainer``)."""
    # Detectron2's yacs solver is SGD only. "AdamW" (decoupled weight decay, Detectron2's own parameter
    # groups and gradient clipping) trains small models from scratch in far fewer iterations.
    cfg.SOLVER.OPTIMIZER = "SGD"
    cfg.SOLVER.BETAS = (0.9, 0.999)  # AdamW only
    # SOLVER.CLIP_GRADIENTS.CLIP_TYPE (Detectron2's key) may also be "full_model": the norm of all gradients
    # together, as mmdetection clips (d2ext.engine.optimizer); Detectron2's "norm" clips each parameter's.


def get_cfg():
    """Detectron2's default config plus the keys of d2ext, nlroi_d2, rdsnet_d2 and adet_lite.

    Any of this repository's YAMLs (and AdelaiDet's) merges into it; an unknown key stays an error.
    """
    # Imported here: the method packages use d2ext, not the other way round.
    import adet_lite
    import nlroi_d2
    import rdsnet_d2

    cfg = d2_get_cfg()
    add_d2ext_config(cfg)
    nlroi_d2.add_nlroi_config(cfg)
    rdsnet_d2.add_rdsnet_config(cfg)
    adet_lite.add_adet_lite_config(cfg)
    return cfg


def resolve_device(cfg):
    """Run a config that asks for CUDA on the CPU when no GPU is present (with a warning)."""
    if cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
        logger.warning("MODEL.DEVICE=%s but CUDA is not available: using the CPU.", cfg.MODEL.DEVICE)
        cfg.MODEL.DEVICE = "cpu"


def setup_cfg(config_file, opts=(), freeze=True):
    cfg = get_cfg()
    if config_file:
        cfg.merge_from_file(config_file)
    cfg.merge_from_list(list(opts))
    resolve_device(cfg)
    if freeze:
        cfg.freeze()
    return cfg
