"""MBRM box refinement at inference for adet_lite's mask models (CondInst / BoxInst, BlendMask, SOLO,
SOLOv2), switched on by ``MODEL.MBRM.ENABLED`` (rdsnet_d2's keys), and its training stage on those models
(``MODEL.MBRM.TRAIN``: the model frozen, only MBRM learns from the soft masks its post-processing makes).

MBRM is rdsnet_d2's (mask based boundary refinement, RDSNet Sec. 3.3). The method packages do not import
each other: this optional use imports rdsnet_d2 here, lazily, only when the switch is on, and the models
hand the built ``MBRM`` to the shared post-processing (a hook of ``d2ext.layers.postprocess_full_image_masks``
for full-image masks; for BlendMask's RoI masks ``rdsnet_d2``'s ``detector_postprocess_with_mbrm``, the
post-processing it shares with Mask R-CNN). Registered meta-architectures in rdsnet_d2 wrapping these models
(as ``GeneralizedRCNNWithMBRM`` wraps Mask R-CNN) would need rdsnet_d2 to import adet_lite when it
registers them and a second META_ARCHITECTURE per model; the switch alone is what the configs change here.
"""


def mbrm_options(cfg, model_name):
    """The ``mbrm`` (an ``rdsnet_d2.MBRM`` or None), ``mbrm_chunk_size`` and ``mbrm_train_iou`` arguments
    of the models.

    A config without ``MODEL.MBRM`` (adet_lite's keys added to Detectron2's config alone, without
    ``rdsnet_d2.add_rdsnet_config``; ``d2ext.engine.get_cfg`` has both) builds the model without MBRM.
    """
    node = cfg.MODEL.get("MBRM")
    if node is None or not (node.ENABLED or node.TRAIN):
        return {"mbrm": None}
    from rdsnet_d2.mbrm_postprocess import build_mbrm, mbrm_train_iou  # optional use of rdsnet_d2: lazy

    return {"mbrm": build_mbrm(cfg, model_name), "mbrm_chunk_size": node.MASK_CHUNK_SIZE,
            "mbrm_train_iou": mbrm_train_iou(cfg)}


def freeze_for_mbrm_stage(model):
    """rdsnet_d2's ``freeze_for_mbrm_stage``: in the MBRM training stage every parameter but MBRM's is frozen.
    Call at the end of the model's ``__init__``. Outside the stage rdsnet_d2 is not imported."""
    if model.mbrm_train_iou is not None:
        from rdsnet_d2.mbrm_training import freeze_for_mbrm_stage as freeze

        freeze(model)


def mbrm_stage_losses(model, batched_inputs):
    """The training losses of the MBRM stage, ``{"loss_mbrm": ...}``: the model's forward in training
    returns them when ``model.mbrm_train_iou`` is set."""
    from rdsnet_d2.mbrm_training import frozen_detector_mbrm_losses

    return frozen_detector_mbrm_losses(model, batched_inputs, model.mbrm_train_iou)
