from detectron2.config import CfgNode as CN

from d2ext.config_checks import COUNT, FRACTION, NON_EMPTY, NON_NEGATIVE, POSITIVE


def add_rdsnet_config(cfg):
    """Add the config keys of rdsnet_d2 (``MODEL.RDSNET`` and ``MODEL.MBRM``) to ``cfg``.

    Anchors, matcher, focal / smooth-L1 losses, score threshold, top-k and NMS of the object stream are
    RetinaNet's keys (``MODEL.RETINANET.*``, ``MODEL.ANCHOR_GENERATOR.*``), reused unchanged.
    """
    cfg.MODEL.RDSNET = CN()
    # Object stream: the representation tower beside RetinaNet's cls / box towers.
    cfg.MODEL.RDSNET.REP_DIM = 32  # d: each anchor predicts 2 x d values (background slot, then foreground)
    cfg.MODEL.RDSNET.HEAD_NORM = "GN"  # norm of the three 4-conv towers ("GN" = GroupNorm(32), "" = none)
    # Pixel stream (P3-P5 merged at stride 8, then up to stride 4, then 1x1 to d).
    cfg.MODEL.RDSNET.PIXEL_IN_FEATURES = ["p3", "p4", "p5"]  # finest first; 2**i upsampling per level
    cfg.MODEL.RDSNET.PIXEL_CONV_DIM = 256  # channels of the pixel stream's convs
    cfg.MODEL.RDSNET.PIXEL_NORM = "GN"  # norm of the pixel stream's 3x3 convs
    # Not an official key: each object representation also holds, per slot, the coefficients of four terms
    # in coordinates normalised to its box (x, y, x^2, y^2; the GT box in training, the detected box at test),
    # added to the correlation's logits, so that a mask can favour its own object over a same-class
    # neighbour inside the box (rdsnet_d2.correlation.box_coordinate_logits). False: the official model.
    cfg.MODEL.RDSNET.BOX_COORD_TERMS = False
    # Masks in training.
    cfg.MODEL.RDSNET.MASK_SAMPLES_PER_IMAGE = 100  # positive anchors per image whose masks are trained
    cfg.MODEL.RDSNET.MASK_MIN_AREA = 100  # an anchor trains a mask only if its GT mask has more pixels
    cfg.MODEL.RDSNET.TRAIN_CROP_EXPAND = 0.25  # GT crop box grows by this fraction of its size per side
    cfg.MODEL.RDSNET.OHEM_NEG_POS_RATIO = 1.0  # hard background pixels kept per foreground pixel
    cfg.MODEL.RDSNET.MASK_LOSS_WEIGHT = 1.0  # weight of loss_mask
    # Masks at test time.
    cfg.MODEL.RDSNET.TEST_CROP_EXPAND = 0.1  # detected box grows by this fraction per side
    cfg.MODEL.RDSNET.MASK_THRESHOLD = 0.4  # soft mask -> binary mask
    cfg.MODEL.RDSNET.MASK_CHUNK_SIZE = 16  # detections upsampled at once (bounds peak test memory)
    # FPN top block (build_rdsnet_resnet_fpn_backbone): levels above P5 computed from C5. 2: P6 and P7 (official);
    # 1: P6 only, for an object stream on P2-P6 (a P7 no head reads gets no gradient, which DDP rejects); 0: none.
    cfg.MODEL.RDSNET.TOP_LEVELS = 2
    cfg.MODEL.RDSNET.P7_RELU = False  # the official P7 = conv(P6) has no ReLU in between (Detectron2's has one)

    cfg.MODEL.MBRM = CN()
    # MBRM: the box refinement at inference, and its training stage, in RDSNet, GeneralizedRCNNWithMBRM (Mask
    # R-CNN) and adet_lite's CondInst / BoxInst, BlendMask, SOLO and SOLOv2.
    cfg.MODEL.MBRM.ENABLED = False  # refine the boxes of the detections with MBRM at inference
    # MBRM training stage: only MBRM learns (loss_mbrm), the rest is frozen; the model refines with it at inference
    cfg.MODEL.MBRM.TRAIN = False
    cfg.MODEL.MBRM.KERNEL_HALF_SIZE = 4  # s: 1-D kernel of 2s + 1 taps
    cfg.MODEL.MBRM.GAMMA = 0.05  # prior sigma = max(GAMMA * box size, 1) pixels
    cfg.MODEL.MBRM.PRIOR_CUTOFF = 0.0044  # prior density <= this is set to 0 (truncation)
    cfg.MODEL.MBRM.TRAIN_IOU = 0.5  # a detection trains MBRM if its IoU with a GT box reaches this
    # Models other than RDSNet: detections whose full-size soft masks (CondInst, SOLO) or pasted RoI-mask
    # windows (Mask R-CNN, BlendMask; one at a time on CPU) are made at once (bounds peak test memory)
    cfg.MODEL.MBRM.MASK_CHUNK_SIZE = 16
    return cfg


# What each MODEL.RDSNET / MODEL.MBRM value must be (booleans and strings aside; MASK_THRESHOLD,
# MASK_CHUNK_SIZE, TOP_LEVELS and MBRM's KERNEL_HALF_SIZE and GAMMA are checked by the modules taking them).
# MODEL.MBRM is checked when an MBRM is built from it (MBRM.ENABLED or TRAIN).
RDSNET_REQUIREMENTS = {
    "REP_DIM": COUNT, "PIXEL_IN_FEATURES": NON_EMPTY, "PIXEL_CONV_DIM": COUNT, "MASK_SAMPLES_PER_IMAGE": COUNT,
    "MASK_MIN_AREA": NON_NEGATIVE, "TRAIN_CROP_EXPAND": NON_NEGATIVE, "OHEM_NEG_POS_RATIO": POSITIVE,
    "MASK_LOSS_WEIGHT": NON_NEGATIVE, "TEST_CROP_EXPAND": NON_NEGATIVE,
}
MBRM_REQUIREMENTS = {"PRIOR_CUTOFF": FRACTION, "TRAIN_IOU": FRACTION, "MASK_CHUNK_SIZE": COUNT}
