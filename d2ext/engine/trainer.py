"""The trainer of ``projects/train_net.py``: Detectron2's DefaultTrainer with COCO evaluation."""
import contextlib
import logging
import os
from unittest import mock

from detectron2.data import build_detection_test_loader, build_detection_train_loader
from detectron2.engine import DefaultTrainer
from detectron2.engine import defaults as d2_defaults

from ..data.mapper import DatasetMapper
from ..evaluation import build_coco_evaluator
from ..layers import register_empty_load_check
from .optimizer import build_optimizer


@contextlib.contextmanager
def _cpu_aware_ddp():
    """Let DefaultTrainer wrap a CPU model in DDP.

    ``create_ddp_model`` passes ``device_ids=[local_rank]``, which DDP rejects for CPU modules; for those
    we pass ``device_ids=None`` (gloo). CUDA models are wrapped exactly as Detectron2 does.
    """
    create_ddp_model = d2_defaults.create_ddp_model

    def wrap(model, **kwargs):
        if next(model.parameters()).device.type == "cpu":
            kwargs.setdefault("device_ids", None)
        return create_ddp_model(model, **kwargs)

    with mock.patch.object(d2_defaults, "create_ddp_model", wrap):
        yield


# Detectron2 v0.6's DefaultTrainer checkpoints the iteration and its hooks' states (the LR scheduler's),
# not the optimizer's: a resumed run lost its momentum and trained its first iteration at the LR the
# optimizer was built with (the warm-up start). Newer Detectron2 adds the optimizer under "_trainer".
_D2_CHECKPOINTS_OPTIMIZER = "state_dict" in vars(DefaultTrainer)


class Trainer(DefaultTrainer):
    def __init__(self, cfg):
        with _cpu_aware_ddp():
            super().__init__(cfg)

    def state_dict(self):
        """What ``--resume`` restores: iteration, hooks (LR scheduler) and the optimizer (momentum, LR)."""
        state = super().state_dict()
        if not _D2_CHECKPOINTS_OPTIMIZER:
            state["_trainer"] = self._trainer.state_dict()
        return state

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        if _D2_CHECKPOINTS_OPTIMIZER:
            return
        if "_trainer" in state_dict:
            self._trainer.load_state_dict(state_dict["_trainer"])
        else:
            logging.getLogger(__name__).warning(
                "The checkpoint has no optimizer state (written by Detectron2 v0.6's trainer): resuming "
                "without the optimizer's state (momentum), at its initial LR for one iteration")

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        if output_folder is None:
            output_folder = os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
        return build_coco_evaluator(dataset_name, output_dir=output_folder)

    @classmethod
    def build_train_loader(cls, cfg):
        """Detectron2's training loader with d2ext's ``DatasetMapper`` (malformed polygons are named)."""
        return build_detection_train_loader(cfg, mapper=DatasetMapper(cfg, is_train=True))

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        """Detectron2's test loader with d2ext's ``DatasetMapper`` (an unreadable image file is named)."""
        return build_detection_test_loader(cfg, dataset_name, mapper=DatasetMapper(cfg, is_train=False))

    @classmethod
    def build_model(cls, cfg):
        """Detectron2's model; a checkpoint that loads nothing into it is an error, also for Detectron2's
        own meta-architectures (``GeneralizedRCNN`` of the NL-RoI configs). A post-processing switch on a model
        that does not read it is an error (it would otherwise be ignored): ``MODEL.MBRM.ENABLED`` or ``TRAIN``
        without MBRM post-processing, ``MODEL.ROI_HEADS.SOFT_NMS`` / ``BOX_VOTE.ENABLED`` without ROI heads
        that apply them."""
        model = super().build_model(cfg)
        mbrm = cfg.MODEL.get("MBRM")
        switches = [key for key in ("ENABLED", "TRAIN") if mbrm is not None and mbrm[key]]
        if switches and getattr(model, "mbrm", None) is None:
            raise ValueError(
                f"MODEL.MBRM.{switches[0]} is True but MODEL.META_ARCHITECTURE {cfg.MODEL.META_ARCHITECTURE!r} has no "
                "MBRM post-processing; MBRM refines boxes from masks in RDSNet, CondInst / BoxInst, BlendMask, "
                "SOLO / SOLOv2 and GeneralizedRCNNWithMBRM (Mask R-CNN)")
        check_roi_postprocess_is_applied(cfg, model)
        register_empty_load_check(model)
        return model

    @classmethod
    def build_optimizer(cls, cfg, model):
        """Detectron2's SGD, or AdamW with the same parameter groups when ``SOLVER.OPTIMIZER`` says so, with
        Detectron2's gradient clipping or ``CLIP_TYPE: "full_model"`` (``d2ext.engine.optimizer``)."""
        return build_optimizer(cfg, model)


def check_roi_postprocess_is_applied(cfg, model):
    """Raise a ValueError if ``MODEL.ROI_HEADS.SOFT_NMS.ENABLED`` or ``BOX_VOTE.ENABLED`` is on but no module of
    ``model`` applies it. The modules that do (nlroi_d2's ROI heads and box predictor) hold the settings as
    ``postprocess``, whose ``changes_nms`` is then True."""
    roi_heads = cfg.MODEL.ROI_HEADS
    switched_on = [f"MODEL.ROI_HEADS.{name}.ENABLED" for name in ("SOFT_NMS", "BOX_VOTE")
                   if name in roi_heads and roi_heads[name].ENABLED]
    if switched_on and not any(getattr(getattr(m, "postprocess", None), "changes_nms", False)
                               for m in model.modules()):
        raise ValueError(
            f"{' and '.join(switched_on)} is True but nothing in MODEL.META_ARCHITECTURE "
            f"{cfg.MODEL.META_ARCHITECTURE!r} / MODEL.ROI_HEADS.NAME {roi_heads.NAME!r} applies it; Soft-NMS and box "
            "voting are applied by MODEL.ROI_HEADS.NAME NLRoIROIHeads and NLRoICascadeROIHeads")
