"""MBRM box refinement at inference for adet_lite's mask models (CondInst / BoxInst, BlendMask, SOLO,
SOLOv2), switched on by ``MODEL.MBRM.ENABLED`` (rdsnet_d2's keys).

MBRM is rdsnet_d2's (mask based boundary refinement, RDSNet Sec. 3.3). The method packages do not import
each other: this optional use imports rdsnet_d2 here, lazily, only when the switch is on, and the models
hand the built ``MBRM`` to the shared post-processing (a hook of ``d2ext.layers.postprocess_full_image_masks``
for full-image masks; for BlendMask's RoI masks ``rdsnet_d2``'s ``detector_postprocess_with_mbrm``, the
post-processing it shares with Mask R-CNN). Registered meta-architectures in rdsnet_d2 wrapping these models
(as ``GeneralizedRCNNWithMBRM`` wraps Mask R-CNN) would need rdsnet_d2 to import adet_lite when it
registers them and a second META_ARCHITECTURE per model; the switch alone is what the configs change here.
"""


def mbrm_options(cfg, model_name):
    """The ``mbrm`` (an ``rdsnet_d2.MBRM`` or None) and ``mbrm_chunk_size`` arguments of the models.

    A config without ``MODEL.MBRM`` (adet_lite's keys added to Detectron2's config alone, without
    ``rdsnet_d2.add_rdsnet_config``; ``d2ext.engine.get_cfg`` has both) builds the model without MBRM.
    ``MODEL.MBRM.TRAIN`` is an error naming the key: MBRM's training stage is RDSNet's.
    """
    node = cfg.MODEL.get("MBRM")
    if node is None or not (node.ENABLED or node.TRAIN):
        return {"mbrm": None}
    from rdsnet_d2.mbrm_postprocess import build_inference_mbrm  # optional use of rdsnet_d2: lazy

    return {"mbrm": build_inference_mbrm(cfg, model_name), "mbrm_chunk_size": node.MASK_CHUNK_SIZE}
