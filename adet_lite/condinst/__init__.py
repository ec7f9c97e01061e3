"""CondInst: meta-architecture ``CondInst`` (FCOS + controller + mask branch + dynamic mask head)."""
from .condinst import CondInst
from .config import add_condinst_config
from .dynamic_mask_head import DynamicMaskHead
from .mask_branch import MaskBranch

__all__ = ["CondInst", "DynamicMaskHead", "MaskBranch", "add_condinst_config"]
