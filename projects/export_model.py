#!/usr/bin/env python
"""Export a model of this repository to TorchScript or ONNX by tracing (Detectron2's export_model.py flags).

    python projects/export_model.py --config-file CFG --export-method tracing --format torchscript \
        --output out/ [--sample-image img.jpg] [--run-eval] MODEL.WEIGHTS model_final.pth

Writes ``model.ts`` (``--format torchscript``) or ``model.onnx`` (``--format onnx``) to ``--output``. The
exported graph takes one uint8 (3, H, W) image in ``INPUT.FORMAT``, resized by the test-time resize, of any
size, and returns the detections at that size (see ``d2ext.export``). It is traced on ``--sample-image``
or on the first image of ``DATASETS.TEST[0]``. ``--run-eval`` evaluates the exported model on
``DATASETS.TEST[0]`` with Detectron2's ``COCOEvaluator`` (the final resize to the original size runs
after the exported model, as in Detectron2's script).
"""
import argparse
import logging
import os

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.evaluation import inference_on_dataset, print_csv_format
from detectron2.modeling import build_model
from detectron2.utils.env import seed_all_rng
from detectron2.utils.logger import setup_logger

from d2ext import export
from d2ext.data.mapper import DatasetMapper
from d2ext.engine import Trainer, setup_cfg
from d2ext.evaluation import build_coco_evaluator

logger = logging.getLogger("d2ext.export_model")
SUPPORTED_METHODS = {"tracing": export.EXPORT_FORMATS}
OUTPUT_FILES = {"torchscript": "model.ts", "onnx": "model.onnx"}


def get_parser():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config-file", required=True, metavar="FILE")
    parser.add_argument("--export-method", default="tracing", choices=["caffe2_tracing", "tracing", "scripting"],
                        help="only 'tracing' is supported")
    parser.add_argument("--format", default="torchscript", choices=["caffe2", "onnx", "torchscript"],
                        help="'torchscript' or 'onnx' (with --export-method tracing)")
    parser.add_argument("--sample-image", default=None, help="image to trace on (default: the first test image)")
    parser.add_argument("--run-eval", action="store_true", help="evaluate the exported model on DATASETS.TEST[0]")
    parser.add_argument("--output", required=True, help="folder for the exported file")
    parser.add_argument("opts", nargs=argparse.REMAINDER, default=[], help="KEY VALUE config overrides")
    return parser


def check_method(export_method, export_format):
    if export_method not in SUPPORTED_METHODS:
        raise SystemExit(f"--export-method {export_method} is not supported: only 'tracing' is (Caffe2 is not "
                         "part of torch 2, and the models' Python control flow does not script)")
    if export_format not in SUPPORTED_METHODS[export_method]:
        raise SystemExit(f"--format {export_format} is not supported with --export-method {export_method}: "
                         f"use one of {', '.join(SUPPORTED_METHODS[export_method])}")


def sample_image(cfg, path):
    """The (3, H, W) uint8 image to trace on, as the test-time ``DatasetMapper`` makes it."""
    if path is None:
        if not cfg.DATASETS.TEST:
            raise SystemExit("give --sample-image or a dataset in DATASETS.TEST to trace on")
        return next(iter(Trainer.build_test_loader(cfg, cfg.DATASETS.TEST[0])))[0]["image"]
    return DatasetMapper(cfg, is_train=False)({"file_name": path})["image"]


def evaluate(cfg, model, exported, outputs_schema, output_dir):
    """COCO evaluation of the exported model: each image through ``exported``, then resized to its
    original size by the model's own post-processing."""

    def run(batched_inputs):
        results = []
        for inputs in batched_inputs:
            instances = export.run_exported(exported, outputs_schema, inputs["image"])
            results.append({"instances": export.postprocess(model, instances, inputs["height"], inputs["width"])})
        return results

    dataset = cfg.DATASETS.TEST[0]
    evaluator = build_coco_evaluator(dataset, output_dir=output_dir, distributed=False)
    metrics = inference_on_dataset(run, Trainer.build_test_loader(cfg, dataset), evaluator)
    print_csv_format(metrics)
    return metrics


def main(args):
    check_method(args.export_method, args.format)
    cfg = setup_cfg(args.config_file, args.opts)
    os.makedirs(args.output, exist_ok=True)
    # As training does (Detectron2's default_setup): a randomly initialised model is then the same in every run.
    seed_all_rng(None if cfg.SEED < 0 else cfg.SEED)
    model = build_model(cfg)
    if cfg.MODEL.WEIGHTS:
        DetectionCheckpointer(model).load(cfg.MODEL.WEIGHTS)
    else:
        logger.warning("MODEL.WEIGHTS is empty: exporting a randomly initialised model")
    model.eval()
    image = sample_image(cfg, args.sample_image)
    path = os.path.join(args.output, OUTPUT_FILES[args.format])
    if args.format == "torchscript":
        exported, outputs_schema = export.export_torchscript(model, image, path)
    else:
        outputs_schema = export.export_onnx(model, image, path)
        exported = export.onnx_session(path)
    logger.info("Exported %s (traced on a %s image) to %s", type(model).__name__, tuple(image.shape), path)
    if args.run_eval:
        return evaluate(cfg, model, exported, outputs_schema, args.output)
    return None


if __name__ == "__main__":
    parsed = get_parser().parse_args()
    setup_logger()  # Detectron2's loggers (the evaluator's results)
    setup_logger(name="d2ext")
    logger.info("Command line arguments: %s", parsed)
    main(parsed)
