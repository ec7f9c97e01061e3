"""The trainer of ``projects/train_net.py``: Detectron2's DefaultTrainer with COCO evaluation."""
import contextlib
import os
from unittest import mock

from detectron2.engine import DefaultTrainer
from detectron2.engine import defaults as d2_defaults

from ..evaluation import build_coco_evaluator


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


class Trainer(DefaultTrainer):
    def __init__(self, cfg):
        with _cpu_aware_ddp():
            super().__init__(cfg)

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        if output_folder is None:
            output_folder = os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
        return build_coco_evaluator(dataset_name, output_dir=output_folder)
