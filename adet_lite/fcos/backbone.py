from detectron2.modeling import BACKBONE_REGISTRY, FPN, ShapeSpec, build_resnet_backbone

from d2ext.layers import fpn_top_block


@BACKBONE_REGISTRY.register()
def build_fcos_resnet_fpn_backbone(cfg, input_shape: ShapeSpec):
    """ResNet + FPN on res3-res5 with ``MODEL.FCOS.TOP_LEVELS`` extra levels computed from P5 (FCOS's P6, P7).

    Parameter names equal AdelaiDet's (``backbone.fpn_*``, ``backbone.top_block.p6/p7``, ``backbone.bottom_up.*``).
    """
    bottom_up = build_resnet_backbone(cfg, input_shape)
    out_channels = cfg.MODEL.FPN.OUT_CHANNELS
    return FPN(
        bottom_up=bottom_up,
        in_features=cfg.MODEL.FPN.IN_FEATURES,
        out_channels=out_channels,
        norm=cfg.MODEL.FPN.NORM,
        top_block=fpn_top_block("MODEL.FCOS.TOP_LEVELS", cfg.MODEL.FCOS.TOP_LEVELS, out_channels, out_channels, "p5"),
        fuse_type=cfg.MODEL.FPN.FUSE_TYPE,
    )
