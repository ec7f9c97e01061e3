"""ResNet-FPN backbone of RDSNet: P3-P7 with P6 from C5, and (official) no ReLU between P6 and P7."""
from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY
from detectron2.modeling.backbone.fpn import FPN, LastLevelP6P7
from detectron2.modeling.backbone.resnet import build_resnet_backbone

from d2ext.layers import fpn_top_block


class LastLevelP6P7NoReLU(LastLevelP6P7):
    """Detectron2's P6/P7 block (same parameter names) without the ReLU before P7, as mmdet v1's FPN
    with ``relu_before_extra_convs=False``."""

    def forward(self, x):
        p6 = self.p6(x)
        return [p6, self.p7(p6)]


@BACKBONE_REGISTRY.register()
def build_rdsnet_resnet_fpn_backbone(cfg, input_shape: ShapeSpec):
    """ResNet + FPN on ``MODEL.FPN.IN_FEATURES`` with ``MODEL.RDSNET.TOP_LEVELS`` levels above P5 from C5."""
    bottom_up = build_resnet_backbone(cfg, input_shape)
    out_channels = cfg.MODEL.FPN.OUT_CHANNELS
    return FPN(
        bottom_up=bottom_up,
        in_features=cfg.MODEL.FPN.IN_FEATURES,
        out_channels=out_channels,
        norm=cfg.MODEL.FPN.NORM,
        top_block=fpn_top_block("MODEL.RDSNET.TOP_LEVELS", cfg.MODEL.RDSNET.TOP_LEVELS,
                                bottom_up.output_shape()["res5"].channels, out_channels, "res5",
                                p6p7_block=LastLevelP6P7 if cfg.MODEL.RDSNET.P7_RELU else LastLevelP6P7NoReLU),
        fuse_type=cfg.MODEL.FPN.FUSE_TYPE,
    )
