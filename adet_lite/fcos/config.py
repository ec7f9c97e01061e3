def add_fcos_config(cfg):
    """Add the config keys of FCOS to ``cfg`` (none yet: FCOS is not built)."""
    return cfg
