from .config import add_condinst_config

__all__ = ["add_condinst_config"]
