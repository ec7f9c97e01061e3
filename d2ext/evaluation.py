"""COCO evaluation that works with any Detectron2 build.

Detectron2's ``COCOEvaluator`` uses its C++ ``COCOeval_opt`` by default. A Detectron2 built by
``tools/build_detectron2.py`` has no compiled ops, so we switch to pycocotools' ``COCOeval`` (the
official implementation; same numbers, slower) whenever the fast one is unavailable.
"""
import logging

from detectron2.data import DatasetCatalog
from detectron2.evaluation import COCOEvaluator

logger = logging.getLogger(__name__)


def has_fast_coco_eval():
    """Whether ``detectron2._C`` provides the C++ COCOeval used by ``COCOeval_opt``."""
    from detectron2 import _C

    return hasattr(_C, "COCOevalAccumulate") and "COCOevalAccumulate" not in getattr(_C, "MISSING_OPS", ())


def build_coco_evaluator(dataset_name, output_dir=None, distributed=True):
    # Loading the dataset first generates a synthetic split (and its COCO json) if needed.
    DatasetCatalog.get(dataset_name)
    fast = has_fast_coco_eval()
    if not fast:
        logger.info("detectron2._C has no C++ COCOeval: evaluating with pycocotools' COCOeval.")
    return COCOEvaluator(dataset_name, distributed=distributed, output_dir=output_dir, use_fast_impl=fast)
