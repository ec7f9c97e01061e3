from .config import add_solo_config

__all__ = ["add_solo_config"]
