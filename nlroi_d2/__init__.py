"""NL-RoI: non-local attention among the RoIs of one image in Mask R-CNN heads (Tseng et al., 2018).

Not built yet: this package only provides its config function (see issue "nlroi_d2").
"""
from .config import add_nlroi_config

__all__ = ["add_nlroi_config"]
