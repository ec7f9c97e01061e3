import fvcore.nn.weight_init as weight_init
from torch import nn
from detectron2.modeling import BACKBONE_REGISTRY, FPN, ShapeSpec, build_resnet_backbone
from detectron2.modeling.backbone.fpn import LastLevelP6P7


class LastLevelP6(nn.Module):
    """FPN top block adding P6 from ``in_feature`` with one stride-2 3x3 conv (FCOS with TOP_LEVELS 1)."""

    def __init__(self, in_channels, out_channels, in_feature="p5"):
        super().__init__()
        self.num_levels = 1
        self.in_feature = in_feature
        self.p6 = nn.Conv2d(in_channels, out_channels, 3, 2, 1)
        weight_init.c2_xavier_fill(self.p6)

    def forward(self, x):
        return [self.p6(x)]


@BACKBONE_REGISTRY.register()
def build_fcos_resnet_fpn_backbone(cfg, input_shape: ShapeSpec):
    """ResNet + FPN on res3-res5 with ``MODEL.FCOS.TOP_LEVELS`` extra levels computed from P5 (FCOS's P6, P7).

    Parameter names equal AdelaiDet's (``backbone.fpn_*``, ``backbone.top_block.p6/p7``, ``backbone.bottom_up.*``).
    """
    bottom_up = build_resnet_backbone(cfg, input_shape)
    out_channels = cfg.MODEL.FPN.OUT_CHANNELS
    top_levels = cfg.MODEL.FCOS.TOP_LEVELS
    if top_levels == 2:
        top_block = LastLevelP6P7(out_channels, out_channels, in_feature="p5")
    elif top_levels == 1:
        top_block = LastLevelP6(out_channels, out_channels, in_feature="p5")
    elif top_levels == 0:
        top_block = None
    else:
        raise ValueError(f"MODEL.FCOS.TOP_LEVELS must be 0, 1 or 2, got {top_levels}")
    return FPN(
        bottom_up=bottom_up,
        in_features=cfg.MODEL.FPN.IN_FEATURES,
        out_channels=out_channels,
        norm=cfg.MODEL.FPN.NORM,
        top_block=top_block,
        fuse_type=cfg.MODEL.FPN.FUSE_TYPE,
    )
