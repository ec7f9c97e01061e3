from .blendmask import add_blendmask_config
from .condinst import add_condinst_config
from .fcos import add_fcos_config
from .solo import add_solo_config


def add_adet_lite_config(cfg):
    """Add the config keys of every adet_lite method to ``cfg`` (AdelaiDet's names and defaults)."""
    add_fcos_config(cfg)
    add_condinst_config(cfg)
    add_blendmask_config(cfg)
    add_solo_config(cfg)
    return cfg
