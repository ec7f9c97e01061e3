def add_rdsnet_config(cfg):
    """Add the config keys of rdsnet_d2 to ``cfg`` (none yet: RDSNet is not built)."""
    return cfg
