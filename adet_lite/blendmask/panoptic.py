"""BlendMask's panoptic output (AdelaiDet's ``MODEL.PANOPTIC_FPN.COMBINE.ENABLED``): Detectron2's semantic
head (``MODEL.SEM_SEG_HEAD``) on the FPN features, trained on the inputs' ``sem_seg`` (Detectron2's
panoptic-separated convention: 0 = any "thing", 1 ... NUM_CLASSES - 1 = stuff classes, IGNORE_VALUE =
unlabelled), and combined with the instances at inference by Detectron2's
``combine_semantic_and_instance_outputs``, as Detectron2's ``PanopticFPN``."""
from typing import Dict, List

import torch
from detectron2.data import MetadataCatalog
from detectron2.layers import ShapeSpec
from detectron2.modeling.meta_arch.panoptic_fpn import combine_semantic_and_instance_outputs
from detectron2.modeling.meta_arch.semantic_seg import build_sem_seg_head
from detectron2.modeling.postprocessing import sem_seg_postprocess
from detectron2.structures import Instances

from d2ext.config_checks import check_in_features


def check_stuff_classes(cfg):
    """Raise a ValueError when a dataset of ``DATASETS.TRAIN`` / ``TEST`` whose metadata lists ``stuff_classes``
    (Detectron2's panoptic-separated COCO: "things" + 53 stuff classes) has another number of them than
    ``MODEL.SEM_SEG_HEAD.NUM_CLASSES``: a larger head trains silently, a smaller one fails mid-training,
    and either way Detectron2's panoptic and semantic evaluators read the classes from that metadata."""
    num_classes = cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES
    for name in (*cfg.DATASETS.TRAIN, *cfg.DATASETS.TEST):
        stuff_classes = MetadataCatalog.get(name).get("stuff_classes")
        if stuff_classes is not None and len(stuff_classes) != num_classes:
            raise ValueError(f"MODEL.SEM_SEG_HEAD.NUM_CLASSES is {num_classes} but dataset {name!r} has "
                             f"{len(stuff_classes)} stuff_classes (with 'things' as class 0 in the "
                             f"panoptic-separated convention): set it to {len(stuff_classes)}")


def panoptic_options(cfg, input_shape: Dict[str, ShapeSpec]):
    """BlendMask's panoptic arguments from ``cfg``: with ``MODEL.PANOPTIC_FPN.COMBINE.ENABLED``, the semantic
    head (``build_sem_seg_head``, attribute ``panoptic_module`` as AdelaiDet's, so that its checkpoints
    load unchanged), its class count and the combination thresholds; otherwise no head (``{}``)."""
    combine = cfg.MODEL.PANOPTIC_FPN.COMBINE
    if not combine.ENABLED:
        return {}
    head = cfg.MODEL.SEM_SEG_HEAD
    # Detectron2's SemSegFPNHead drops the missing features silently: say so (the panoptic configs put
    # res2 into the FPN for P2).
    check_in_features("MODEL.SEM_SEG_HEAD.IN_FEATURES", head.IN_FEATURES, input_shape)
    check_stuff_classes(cfg)
    return {
        "panoptic_module": build_sem_seg_head(cfg, input_shape),
        "sem_seg_num_classes": head.NUM_CLASSES,
        "combine_overlap_thresh": combine.OVERLAP_THRESH,
        "combine_stuff_area_thresh": combine.STUFF_AREA_LIMIT,
        "combine_instances_score_thresh": combine.INSTANCES_CONFIDENCE_THRESH,
    }


def sem_seg_targets(batched_inputs: List[Dict], image_sizes, padded_size, num_classes, ignore_value, device):
    """The inputs' ``sem_seg`` padded like the images, checked.

    Args:
        batched_inputs: training inputs, each with ``sem_seg`` (H, W) int64 at its input image size.
        image_sizes: per input (H, W) of its image before padding.
        padded_size: (H', W') of the padded image batch.
        num_classes: ``MODEL.SEM_SEG_HEAD.NUM_CLASSES``; labels are in [0, num_classes) or ``ignore_value``.
        ignore_value: ``MODEL.SEM_SEG_HEAD.IGNORE_VALUE``, also the padding.
    Returns:
        (N, H', W') int64 on ``device``.
    """
    missing = [i for i, x in enumerate(batched_inputs) if "sem_seg" not in x]
    if missing:
        raise ValueError(
            f"BlendMask with MODEL.PANOPTIC_FPN.COMBINE.ENABLED trains its semantic head on the field 'sem_seg' "
            f"of every training input; inputs {missing} have none. Train on a dataset whose records have "
            f"'sem_seg_file_name' (Detectron2's DatasetMapper loads it), such as Detectron2's "
            f"coco_2017_train_panoptic_separated, or set MODEL.PANOPTIC_FPN.COMBINE.ENABLED False")
    targets = torch.full((len(batched_inputs), *padded_size), ignore_value, dtype=torch.int64, device=device)
    for i, (x, size) in enumerate(zip(batched_inputs, image_sizes)):
        sem_seg = x["sem_seg"]
        if tuple(sem_seg.shape) != tuple(size):
            raise ValueError(f"input {i}: 'sem_seg' has shape {tuple(sem_seg.shape)} but its image is {tuple(size)}")
        targets[i, : size[0], : size[1]] = sem_seg.to(device)
    invalid = (targets != ignore_value) & ((targets < 0) | (targets >= num_classes))
    if invalid.any():
        raise ValueError(f"'sem_seg' holds label {int(targets[invalid][0])}, outside [0, {num_classes}) given by "
                         f"MODEL.SEM_SEG_HEAD.NUM_CLASSES and not MODEL.SEM_SEG_HEAD.IGNORE_VALUE {ignore_value}")
    return targets


def panoptic_postprocess(instances: Instances, sem_seg_logits, image_size, overlap_thresh, stuff_area_thresh,
                         instances_score_thresh):
    """One image's semantic and panoptic outputs, as Detectron2's ``PanopticFPN``.

    Args:
        instances: the image's post-processed detections (``image_size`` = the output size) with boolean
            ``pred_masks``.
        sem_seg_logits: (C, H', W') the semantic head's logits over the padded input.
        image_size: (h, w) of the input image before padding.
        overlap_thresh, stuff_area_thresh, instances_score_thresh: ``combine_semantic_and_instance_outputs``'s.
    Returns:
        ``{"sem_seg": (C, H, W) logits at the output size, "panoptic_seg": ((H, W) int32 segment ids,
        segments info)}``.
    """
    height, width = instances.image_size
    sem_seg = sem_seg_postprocess(sem_seg_logits, image_size, height, width)
    panoptic_seg = combine_semantic_and_instance_outputs(instances, sem_seg.argmax(dim=0), overlap_thresh,
                                                         stuff_area_thresh, instances_score_thresh)
    return {"sem_seg": sem_seg, "panoptic_seg": panoptic_seg}
