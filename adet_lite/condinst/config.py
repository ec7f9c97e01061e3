def add_condinst_config(cfg):
    """Add the config keys of CONDINST to ``cfg`` (none yet: CONDINST is not built)."""
    return cfg
