def add_solo_config(cfg):
    """Add the config keys of SOLO to ``cfg`` (none yet: SOLO is not built)."""
    return cfg
