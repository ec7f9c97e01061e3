import fvcore.nn.weight_init as weight_init
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
