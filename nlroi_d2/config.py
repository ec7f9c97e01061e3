def add_nlroi_config(cfg):
    """Add the config keys of nlroi_d2 to ``cfg`` (none yet: the NL-RoI heads are not built)."""
    return cfg
