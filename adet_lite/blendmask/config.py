from detectron2.config import CfgNode as CN

from d2ext.config_checks import COUNT, NON_EMPTY, NON_NEGATIVE, POSITIVES, one_of


def add_blendmask_config(cfg):
    """Add ``MODEL.BLENDMASK`` and ``MODEL.BASIS_MODULE`` (AdelaiDet's names and defaults) to ``cfg``."""
    cfg.MODEL.BLENDMASK = CN()
    _B = cfg.MODEL.BLENDMASK
    _B.ATTN_SIZE = 14  # M: each detection predicts K attention maps of M x M
    _B.TOP_INTERP = "bilinear"  # F.interpolate mode resizing the attentions to R x R
    _B.BOTTOM_RESOLUTION = 56  # R: RoIAlign output size of the bases (and of the predicted masks)
    _B.POOLER_TYPE = "ROIAlignV2"  # Detectron2 ROIPooler type cropping the bases
    _B.POOLER_SAMPLING_RATIO = 1  # RoIAlign sampling ratio
    _B.POOLER_SCALES = (0.25,)  # 1 / stride of the bases (must match the basis module's output)
    _B.INSTANCE_LOSS_WEIGHT = 1.0  # weight of the mask loss (loss_mask)
    _B.VISUALIZE = False  # AdelaiDet's basis visualisation output: not built here (True is an error)

    cfg.MODEL.BASIS_MODULE = CN()
    _M = cfg.MODEL.BASIS_MODULE
    _M.NAME = "ProtoNet"  # name in BASIS_MODULE_REGISTRY
    _M.NUM_BASES = 4  # K: bases predicted at stride 4
    _M.LOSS_ON = False  # auxiliary semantic loss on the basis module's input (Base-BlendMask: True)
    _M.ANN_SET = "coco"  # AdelaiDet's precomputed-map dataset name; unused (targets come from the instances)
    _M.CONVS_DIM = 128  # channels inside the basis module
    _M.IN_FEATURES = ["p3", "p4", "p5"]  # fused features; the first sets the resolution (bases at half its stride)
    _M.NORM = "SyncBN"  # norm of the basis module's convs; "SyncBN" means "BN" in a single process
    _M.NUM_CONVS = 3  # 3x3 convs before the x2 upsampling
    _M.COMMON_STRIDE = 8  # stride of the semantic loss (must equal that of IN_FEATURES[0])
    _M.NUM_CLASSES = 80  # foreground classes of the semantic loss (+1 background channel)
    _M.LOSS_WEIGHT = 0.3  # weight of the semantic loss (loss_basis_sem)
    return cfg


# What each MODEL.BLENDMASK / MODEL.BASIS_MODULE value must be (booleans and the other strings aside).
BLENDMASK_REQUIREMENTS = {
    "ATTN_SIZE": COUNT, "BOTTOM_RESOLUTION": COUNT, "POOLER_TYPE": one_of("ROIAlignV2", "ROIAlign", "ROIPool"),
    "POOLER_SCALES": POSITIVES, "INSTANCE_LOSS_WEIGHT": NON_NEGATIVE,
}
BASIS_MODULE_REQUIREMENTS = {
    "NUM_BASES": COUNT, "CONVS_DIM": COUNT, "IN_FEATURES": NON_EMPTY, "NUM_CONVS": NON_NEGATIVE,
    "NUM_CLASSES": COUNT, "LOSS_WEIGHT": NON_NEGATIVE,
}
