from detectron2.config import CfgNode as CN

from d2ext.config_checks import COUNT, COUNT_OR_OFF, FRACTION, NON_EMPTY, NON_NEGATIVE, Requirement


def add_condinst_config(cfg):
    """Add ``MODEL.CONDINST`` and ``MODEL.BOXINST`` (AdelaiDet's names and defaults) to ``cfg``."""
    cfg.MODEL.CONDINST = CN()
    _C = cfg.MODEL.CONDINST
    _C.MASK_OUT_STRIDE = 4  # stride of the dynamic mask head's output (and of the mask targets)
    _C.BOTTOM_PIXELS_REMOVED = -1  # AdelaiDet compatibility: must stay -1 (BoxInst uses MODEL.BOXINST.*)
    _C.MAX_PROPOSALS = -1  # training: at most this many positives (random) per batch get masks (-1: all)
    _C.TOPK_PROPOSALS_PER_IM = -1  # training: else top-k positives per image, shared among its objects

    _C.MASK_HEAD = CN()
    _C.MASK_HEAD.CHANNELS = 8  # channels of the dynamic convs
    _C.MASK_HEAD.NUM_LAYERS = 3  # dynamic 1x1 convs per instance
    _C.MASK_HEAD.USE_FP16 = False  # run the dynamic head in fp16 (CUDA only)
    _C.MASK_HEAD.DISABLE_REL_COORDS = False  # do not append the relative coordinates

    _C.MASK_BRANCH = CN()
    _C.MASK_BRANCH.OUT_CHANNELS = 8  # channels of the mask features given to the dynamic head
    _C.MASK_BRANCH.IN_FEATURES = ["p3", "p4", "p5"]  # fused features; the first sets the stride
    _C.MASK_BRANCH.CHANNELS = 128  # channels inside the mask branch
    _C.MASK_BRANCH.NORM = "BN"  # norm of the mask branch convs
    _C.MASK_BRANCH.NUM_CONVS = 4  # convs of the mask branch tower
    _C.MASK_BRANCH.SEMANTIC_LOSS_ON = False  # auxiliary semantic segmentation loss on the mask branch

    cfg.MODEL.BOXINST = CN()
    _B = cfg.MODEL.BOXINST
    _B.ENABLED = False  # BoxInst: train CondInst from boxes only (projection + pairwise losses)
    _B.BOTTOM_PIXELS_REMOVED = 10  # BoxInst: bottom image rows (original resolution) left out of the pairwise loss
    _B.PAIRWISE = CN()
    _B.PAIRWISE.SIZE = 3  # BoxInst: pairwise neighbourhood size
    _B.PAIRWISE.DILATION = 2  # BoxInst: pairwise neighbourhood dilation
    _B.PAIRWISE.WARMUP_ITERS = 10000  # BoxInst: warm-up of the pairwise loss
    _B.PAIRWISE.COLOR_THRESH = 0.3  # BoxInst: colour-similarity threshold
    return cfg


# What each MODEL.CONDINST / MODEL.BOXINST value must be (booleans and strings aside).
CONDINST_REQUIREMENTS = {
    "MASK_OUT_STRIDE": COUNT, "MAX_PROPOSALS": COUNT_OR_OFF, "TOPK_PROPOSALS_PER_IM": COUNT_OR_OFF,
    "MASK_HEAD.CHANNELS": COUNT, "MASK_BRANCH.OUT_CHANNELS": COUNT, "MASK_BRANCH.IN_FEATURES": NON_EMPTY,
    "MASK_BRANCH.CHANNELS": COUNT, "MASK_BRANCH.NUM_CONVS": NON_NEGATIVE,
}
ODD_NEIGHBOURHOOD = Requirement(lambda v: v >= 3 and v % 2 == 1, "an odd number >= 3")
BOXINST_REQUIREMENTS = {
    "BOTTOM_PIXELS_REMOVED": NON_NEGATIVE, "PAIRWISE.SIZE": ODD_NEIGHBOURHOOD, "PAIRWISE.DILATION": COUNT,
    "PAIRWISE.WARMUP_ITERS": NON_NEGATIVE, "PAIRWISE.COLOR_THRESH": FRACTION,
}
