from detectron2.config import CfgNode as CN

from d2ext.config_checks import (COUNT, COUNTS, FOCAL_ALPHA, FRACTION, NON_EMPTY, NON_NEGATIVE, POSITIVE, PRIOR,
                                 Requirement)


def _add_grid_head_keys(node, instance_channels, num_instance_convs):
    """Keys shared by MODEL.SOLO and MODEL.SOLOV2 (AdelaiDet's names and defaults)."""
    # FPN levels the instance (category / mask or kernel) branches run on; P2 is halved, P6 resized to P5.
    node.INSTANCE_IN_FEATURES = ["p2", "p3", "p4", "p5", "p6"]
    # Stride of each instance level after that resizing (used by the area > stride filter).
    node.FPN_INSTANCE_STRIDES = [8, 8, 16, 32, 32]
    # Inclusive, overlapping ranges of sqrt(box area) that each level is trained on.
    node.FPN_SCALE_RANGES = ((1, 96), (48, 192), (96, 384), (192, 768), (384, 2048))
    # Centre region: +- SIGMA * half the box size around the mask's centre of mass (capped to 3 x 3 cells).
    node.SIGMA = 0.2
    # Channels of the category / mask-or-kernel towers.
    node.INSTANCE_CHANNELS = instance_channels
    # Convs (3x3, norm, ReLU) per tower.
    node.NUM_INSTANCE_CONVS = num_instance_convs
    # Grid size S of each level.
    node.NUM_GRIDS = [40, 36, 24, 16, 12]
    # Number of foreground classes.
    node.NUM_CLASSES = 80
    # Norm of the towers ("GN", "BN", "SyncBN", "" for none).
    node.NORM = "GN"
    # Initial foreground probability of the category (and SOLO mask) predictors' bias.
    node.PRIOR_PROB = 0.01
    # Inference: candidates kept (by score) before Matrix NMS.
    node.NMS_PRE = 500
    # Inference: category score threshold (strict) on the point-NMS'ed grid.
    node.SCORE_THR = 0.1
    # Inference: minimum score after Matrix NMS decay.
    node.UPDATE_THR = 0.05
    # Inference: mask probability threshold (strict) for binary masks.
    node.MASK_THR = 0.5
    # Inference: detections per image.
    node.MAX_PER_IMG = 100
    # Inference: "matrix" (Matrix NMS) or "mask" (greedy mask NMS).
    node.NMS_TYPE = "matrix"
    # Matrix NMS decay kernel: "gaussian" or "linear".
    node.NMS_KERNEL = "gaussian"
    # Matrix NMS gaussian sigma.
    node.NMS_SIGMA = 2.0
    # Greedy mask NMS (NMS_TYPE "mask"): mask IoU above which a lower-scored same-class mask is removed.
    node.MASK_NMS_THR = 0.5
    node.LOSS = CN()
    # Only sigmoid focal loss is implemented (kept for AdelaiDet YAML compatibility).
    node.LOSS.FOCAL_USE_SIGMOID = True
    # Focal loss alpha.
    node.LOSS.FOCAL_ALPHA = 0.25
    # Focal loss gamma.
    node.LOSS.FOCAL_GAMMA = 2.0
    # Weight of the category (focal) loss.
    node.LOSS.FOCAL_WEIGHT = 1.0
    # Weight of the mask (Dice) loss.
    node.LOSS.DICE_WEIGHT = 3.0
    # Not an AdelaiDet or mmdetection key. Mask targets are the fraction of each target pixel the instance
    # covers (area downsampling of its full-resolution mask) instead of that fraction binarised at >= 0.5 (the
    # references): binarising at the mask stride moves the boundary by up to half a target pixel, outwards
    # where the fraction is exactly 0.5, which costs small objects most. The Dice loss is minimal where the
    # probabilities equal the fractions, so the 0.5 threshold at test finds the boundary.
    node.LOSS.COVERAGE_MASK_TARGETS = False


def add_solo_config(cfg):
    """Add MODEL.SOLO (SOLO, Decoupled SOLO, Decoupled SOLO Light) and MODEL.SOLOV2 (AdelaiDet's keys, plus
    MASK_OUT_STRIDE and RELATIVE_COORD_TERMS)."""
    cfg.MODEL.SOLO = CN()
    # Mask branch: "SOLO" (S^2 masks), "DecoupledSOLO" (X / Y towers), "DecoupledSOLOLight" (one tower).
    cfg.MODEL.SOLO.VARIANT = "SOLO"
    _add_grid_head_keys(cfg.MODEL.SOLO, instance_channels=256, num_instance_convs=7)

    cfg.MODEL.SOLOV2 = CN()
    _add_grid_head_keys(cfg.MODEL.SOLOV2, instance_channels=512, num_instance_convs=4)
    # Channels of the FPN features the kernel / category branches read (must match the backbone).
    cfg.MODEL.SOLOV2.INSTANCE_IN_CHANNELS = 256
    # Dynamic kernel length E: channels of the unified mask features (1x1 kernels).
    cfg.MODEL.SOLOV2.NUM_KERNELS = 256
    # Append CoordConv channels to the kernel branch input and the deepest mask-feature level.
    cfg.MODEL.SOLOV2.USE_COORD_CONV = True
    # FPN levels fused into the unified stride-4 mask features (the first one sets the stride).
    cfg.MODEL.SOLOV2.MASK_IN_FEATURES = ["p2", "p3", "p4", "p5"]
    # Channels of those FPN features (must match the backbone).
    cfg.MODEL.SOLOV2.MASK_IN_CHANNELS = 256
    # Channels of the mask-feature branch's per-level convs.
    cfg.MODEL.SOLOV2.MASK_CHANNELS = 128
    # Channels of the unified mask features (must equal NUM_KERNELS).
    cfg.MODEL.SOLOV2.NUM_MASKS = 256
    # Not an AdelaiDet key. Stride of the predicted masks (training targets and inference): the mask
    # features' stride (4 with P2, the reference), or a divisor of it; the masks' logits are then upsampled
    # bilinearly by the ratio, as CondInst's MASK_OUT_STRIDE.
    cfg.MODEL.SOLOV2.MASK_OUT_STRIDE = 4
    # Not an AdelaiDet key. The kernel branch also predicts, per cell, the coefficients of x, y, x^2, y^2 in
    # coordinates relative to the cell's centre (adet_lite.solo.solov2_mask_branch.relative_coordinate_logits),
    # added to the mask's logits: a mask can then favour the pixels near its cell over a same-class neighbour,
    # which a 1x1 kernel on shared features cannot. False: SOLOv2 as published (and its checkpoints).
    cfg.MODEL.SOLOV2.RELATIVE_COORD_TERMS = False
    return cfg


SCALE_RANGES = Requirement(lambda v: all(len(r) == 2 and 0 <= r[0] <= r[1] for r in v),
                           "a list of (low, high) pairs with 0 <= low <= high")
# What each value of MODEL.SOLO and MODEL.SOLOV2 must be (booleans and strings aside; the per-level lists
# also need one entry per level, checked beside).
GRID_HEAD_REQUIREMENTS = {
    "INSTANCE_IN_FEATURES": NON_EMPTY, "FPN_INSTANCE_STRIDES": COUNTS, "FPN_SCALE_RANGES": SCALE_RANGES,
    "SIGMA": NON_NEGATIVE, "INSTANCE_CHANNELS": COUNT, "NUM_INSTANCE_CONVS": COUNT, "NUM_GRIDS": COUNTS,
    "NUM_CLASSES": COUNT, "PRIOR_PROB": PRIOR, "NMS_PRE": COUNT, "SCORE_THR": FRACTION, "UPDATE_THR": FRACTION,
    "MASK_THR": FRACTION, "MAX_PER_IMG": COUNT, "NMS_SIGMA": POSITIVE, "MASK_NMS_THR": FRACTION,
    "LOSS.FOCAL_ALPHA": FOCAL_ALPHA, "LOSS.FOCAL_GAMMA": NON_NEGATIVE, "LOSS.FOCAL_WEIGHT": NON_NEGATIVE,
    "LOSS.DICE_WEIGHT": NON_NEGATIVE,
}
SOLOV2_REQUIREMENTS = {
    **GRID_HEAD_REQUIREMENTS, "NUM_KERNELS": COUNT, "MASK_IN_FEATURES": NON_EMPTY, "MASK_CHANNELS": COUNT,
    "NUM_MASKS": COUNT, "MASK_OUT_STRIDE": COUNT,
}
