from .config import add_fcos_config

__all__ = ["add_fcos_config"]
