from detectron2.config import CfgNode as CN

from d2ext.config_checks import COUNT, FRACTION, NON_NEGATIVE, POSITIVE, Requirement, one_of

from .box_voting import BOX_VOTING_SCORING_METHODS
from .soft_nms import SOFT_NMS_METHODS


def add_nlroi_config(cfg):
    """Add the config keys of nlroi_d2 to ``cfg`` (call before ``merge_from_file``)."""
    cfg.MODEL.NL_ROI = CN()
    # Df: output channels of phi and psi (the affinity is a dot product over Df*H*W values).
    cfg.MODEL.NL_ROI.EMBED_CHANNELS = 64
    # Dg: output channels of g, appended to the RoI features before the first head layer.
    cfg.MODEL.NL_ROI.G_CHANNELS = 32
    # Divide the RoI affinities by sqrt(Df*H*W) before the softmax (the paper does not).
    cfg.MODEL.NL_ROI.SCALE_AFFINITY = False

    cfg.MODEL.ROI_HEADS.SOFT_NMS = CN()
    # Replace per-class hard NMS by Soft-NMS at test time (NLRoIROIHeads / NLRoICascadeROIHeads).
    cfg.MODEL.ROI_HEADS.SOFT_NMS.ENABLED = False
    # "linear", "gaussian" or "hard"; linear and hard use MODEL.ROI_HEADS.NMS_THRESH_TEST as overlap threshold.
    cfg.MODEL.ROI_HEADS.SOFT_NMS.METHOD = "linear"
    # Gaussian decay: score *= exp(-IoU^2 / SIGMA).
    cfg.MODEL.ROI_HEADS.SOFT_NMS.SIGMA = 0.5
    # Boxes whose decayed score falls below this floor are dropped (Detectron1: 1e-4).
    cfg.MODEL.ROI_HEADS.SOFT_NMS.SCORE_FLOOR = 1e-4

    cfg.MODEL.ROI_HEADS.BOX_VOTE = CN()
    # Refine each kept box by the score-weighted mean of the pre-NMS boxes of its class that overlap it.
    cfg.MODEL.ROI_HEADS.BOX_VOTE.ENABLED = False
    # Boxes with IoU >= this threshold vote (Detectron1 default 0.8; its shipped configs use 0.9).
    cfg.MODEL.ROI_HEADS.BOX_VOTE.IOU_THRESHOLD = 0.8
    # Score of a voted box: ID, TEMP_AVG, AVG, IOU_AVG, GENERALIZED_AVG or QUASI_SUM.
    cfg.MODEL.ROI_HEADS.BOX_VOTE.SCORING_METHOD = "ID"
    # The beta of TEMP_AVG, GENERALIZED_AVG and QUASI_SUM.
    cfg.MODEL.ROI_HEADS.BOX_VOTE.BETA = 1.0
    return cfg


# What each MODEL.NL_ROI value must be (SCALE_AFFINITY aside).
NL_ROI_REQUIREMENTS = {"EMBED_CHANNELS": COUNT, "G_CHANNELS": COUNT}
# What the MODEL.ROI_HEADS values read by Soft-NMS / box voting must be, checked when it is enabled.
SOFT_NMS_REQUIREMENTS = {
    "SOFT_NMS.METHOD": one_of(*SOFT_NMS_METHODS), "SOFT_NMS.SIGMA": POSITIVE, "SOFT_NMS.SCORE_FLOOR": NON_NEGATIVE,
    "NMS_THRESH_TEST": FRACTION,
}
BOX_VOTE_REQUIREMENTS = {
    "BOX_VOTE.SCORING_METHOD": one_of(*BOX_VOTING_SCORING_METHODS),
    "BOX_VOTE.IOU_THRESHOLD": Requirement(lambda v: 0 < v <= 1, "in (0, 1]"),
    "BOX_VOTE.BETA": Requirement(lambda v: v != 0, "a number != 0"),  # TEMP_AVG / GENERALIZED_AVG divide by it
}
