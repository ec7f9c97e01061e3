from .config import get_cfg, setup_cfg
from .launch import launch
from .trainer import Trainer

__all__ = ["Trainer", "get_cfg", "launch", "setup_cfg"]
