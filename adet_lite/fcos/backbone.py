from detectron2.modeling import BACKBONE_REGISTRY, FPN, ShapeSpec, build_resnet_backbone
from detectron2.modeling.backbone.fpn import LastLevelP6P7

from d2ext.layers import LastLevelP6


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
