def add_adet_lite_config(cfg):
    """Add the config keys of adet_lite to ``cfg`` (none yet: its methods are not built)."""
    return cfg
