"""RDSNet: reciprocal object detection and instance segmentation, with MBRM (Wang et al., AAAI 2020).

Not built yet: this package only provides its config function (see issue "rdsnet_d2").
"""
from .config import add_rdsnet_config

__all__ = ["add_rdsnet_config"]
