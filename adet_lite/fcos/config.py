from detectron2.config import CfgNode as CN

from d2ext.config_checks import (COUNT, COUNTS, FOCAL_ALPHA, FRACTION, INCREASING, NON_EMPTY, NON_NEGATIVE,
                                 POSITIVE, PRIOR)


def add_fcos_config(cfg):
    """Add ``MODEL.FCOS`` (AdelaiDet's names and defaults) to ``cfg``."""
    cfg.MODEL.FCOS = CN()
    _C = cfg.MODEL.FCOS
    _C.NUM_CLASSES = 80  # foreground classes (no background class)
    _C.IN_FEATURES = ["p3", "p4", "p5", "p6", "p7"]  # backbone features the head runs on
    _C.FPN_STRIDES = [8, 16, 32, 64, 128]  # stride of each feature in IN_FEATURES
    _C.PRIOR_PROB = 0.01  # initial foreground probability of the classification logits
    _C.INFERENCE_TH_TRAIN = 0.05  # score threshold of the candidates decoded in training (YIELD_PROPOSAL)
    _C.INFERENCE_TH_TEST = 0.05  # score threshold of the candidates at test time
    _C.NMS_TH = 0.6  # IoU threshold of the class-aware NMS
    _C.PRE_NMS_TOPK_TRAIN = 1000  # candidates kept per level before NMS (training)
    _C.PRE_NMS_TOPK_TEST = 1000  # candidates kept per level before NMS (test)
    _C.POST_NMS_TOPK_TRAIN = 100  # detections kept per image after NMS (training)
    _C.POST_NMS_TOPK_TEST = 100  # detections kept per image after NMS (test)
    _C.TOP_LEVELS = 2  # extra levels built from P5 by the backbone (2: P6 and P7)
    _C.NORM = "GN"  # norm of the towers ("GN", "BN", "SyncBN", "" for none)
    _C.USE_SCALE = True  # one learnable scale per level on the regression
    _C.THRESH_WITH_CTR = False  # apply the score threshold to cls * centerness instead of cls
    _C.LOSS_ALPHA = 0.25  # focal loss alpha
    _C.LOSS_GAMMA = 2.0  # focal loss gamma
    _C.LOSS_NORMALIZER_CLS = "fg"  # classification loss normaliser: "fg", "moving_fg" or "all"
    _C.LOSS_WEIGHT_CLS = 1.0  # weight of the classification loss
    _C.SIZES_OF_INTEREST = [64, 128, 256, 512]  # max regression distance bounds between levels (px)
    _C.USE_RELU = True  # regression = relu(scale * x); False: exp(scale * x)
    _C.USE_DEFORMABLE = False  # deformable conv in the towers (not supported here: error)
    _C.NUM_CLS_CONVS = 4  # convs of the classification tower
    _C.NUM_BOX_CONVS = 4  # convs of the box tower
    _C.NUM_SHARE_CONVS = 0  # convs shared by both towers, before them
    _C.CENTER_SAMPLE = True  # positives only within POS_RADIUS strides of the object centre
    _C.POS_RADIUS = 1.5  # centre-sampling radius, in strides of the level
    _C.LOC_LOSS_TYPE = "giou"  # box loss: "giou", "iou" (-log IoU) or "linear_iou" (1 - IoU)
    _C.YIELD_PROPOSAL = False  # also decode detections in training (returned as proposals)
    _C.YIELD_BOX_FEATURES = False  # AdelaiDet compatibility: FCOS.predict() always returns the box towers
    _C.BOX_QUALITY = "ctrness"  # quality branch target: "ctrness" (centerness) or "iou"
    return cfg


def check_fcos_proposal_generator(cfg, model_name):
    """Models built on FCOS (CondInst, BlendMask, RDSNetFCOS) need it as their proposal generator."""
    if cfg.MODEL.PROPOSAL_GENERATOR.NAME != "FCOS":
        raise ValueError(f"{model_name} needs MODEL.PROPOSAL_GENERATOR.NAME 'FCOS', got "
                         f"{cfg.MODEL.PROPOSAL_GENERATOR.NAME!r}")


# What each MODEL.FCOS value must be (NORM: check_norm; TOP_LEVELS: the backbone; the other strings against
# their choices in FCOS; booleans).
FCOS_REQUIREMENTS = {
    "NUM_CLASSES": COUNT, "IN_FEATURES": NON_EMPTY, "FPN_STRIDES": COUNTS, "PRIOR_PROB": PRIOR,
    "INFERENCE_TH_TRAIN": FRACTION, "INFERENCE_TH_TEST": FRACTION, "NMS_TH": FRACTION,
    "PRE_NMS_TOPK_TRAIN": COUNT, "PRE_NMS_TOPK_TEST": COUNT,  # (POST_NMS_TOPK_*: any; <= 0 keeps all, as AdelaiDet)
    "LOSS_ALPHA": FOCAL_ALPHA, "LOSS_GAMMA": NON_NEGATIVE, "LOSS_WEIGHT_CLS": NON_NEGATIVE,
    "SIZES_OF_INTEREST": INCREASING, "NUM_CLS_CONVS": NON_NEGATIVE, "NUM_BOX_CONVS": NON_NEGATIVE,
    "NUM_SHARE_CONVS": NON_NEGATIVE, "POS_RADIUS": POSITIVE,
}
