import fvcore.nn.weight_init as weight_init
from detectron2.modeling.backbone.fpn import LastLevelP6P7
from torch import nn


class LastLevelP6(nn.Module):
    """FPN top block adding one level, P6, with a stride-2 3x3 conv on ``in_feature``: Detectron2's
    ``LastLevelP6P7`` without P7 (same parameter name ``p6`` and initialisation), for dense heads on P2-P6
    or P3-P6, which would leave a P7 without gradient (Detectron2's DistributedDataParallel rejects that)."""

    def __init__(self, in_channels, out_channels, in_feature="p5"):
        super().__init__()
        self.num_levels = 1
        self.in_feature = in_feature
        self.p6 = nn.Conv2d(in_channels, out_channels, 3, 2, 1)
        weight_init.c2_xavier_fill(self.p6)

    def forward(self, x):
        return [self.p6(x)]


def fpn_top_block(config_key, num_levels, in_channels, out_channels, in_feature, p6p7_block=LastLevelP6P7):
    """The FPN top block adding ``num_levels`` levels above P5 from ``in_feature``: 2 = P6 and P7
    (``p6p7_block``), 1 = P6 (:class:`LastLevelP6`), 0 = none (``None``); ``config_key`` names the setting in
    the error for any other value."""
    if num_levels == 2:
        return p6p7_block(in_channels, out_channels, in_feature=in_feature)
    if num_levels == 1:
        return LastLevelP6(in_channels, out_channels, in_feature=in_feature)
    if num_levels == 0:
        return None
    raise ValueError(f"{config_key} must be 0, 1 or 2, got {num_levels!r}")
