#!/usr/bin/env python
"""Learning benchmark: CondInst vs Detectron2's Mask R-CNN, both quick-start models (ResNet-18-FPN, from
scratch) trained on the built-in synthetic shapes with the same iteration budget and evaluated with COCO
box / mask AP in the same run. The issue's bar: CondInst's mask AP within 5 points of Mask R-CNN's.

    python benchmarks/condinst_learning.py                       # quick-start schedule (700 iterations)
    python benchmarks/condinst_learning.py --max-iter 300 --threads 2

A script, not a test: the default budget takes tens of minutes per model on a CPU.
"""
import argparse
import os
import sys
import tempfile
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from d2ext import benchmark  # noqa: E402
from d2ext.engine import Trainer, setup_cfg  # noqa: E402

MODELS = [("Mask R-CNN R18-FPN (baseline)", "configs/quickstart/mask_rcnn_R18_FPN_synthetic.yaml"),
          ("CondInst R18-FPN", "configs/quickstart/condinst_R18_synthetic.yaml")]


def train_and_evaluate(config, max_iter, eval_dataset, output_dir, device):
    opts = ["OUTPUT_DIR", output_dir, "MODEL.DEVICE", device, "DATASETS.TEST", (eval_dataset,)]
    if max_iter:
        # Same schedule shape as the config: LR steps at the same fractions of the budget.
        cfg = setup_cfg(os.path.join(REPO, config), opts, freeze=False)
        fractions = [step / cfg.SOLVER.MAX_ITER for step in cfg.SOLVER.STEPS]
        steps = tuple(sorted({int(f * max_iter) for f in fractions} - {0}))
        opts += ["SOLVER.MAX_ITER", max_iter, "SOLVER.STEPS", steps,
                 "SOLVER.WARMUP_ITERS", min(cfg.SOLVER.WARMUP_ITERS, max_iter), "SOLVER.CHECKPOINT_PERIOD", max_iter]
    cfg = setup_cfg(os.path.join(REPO, config), opts)
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    start = time.perf_counter()
    trainer.train()
    train_seconds = time.perf_counter() - start
    results = Trainer.test(cfg, trainer.model)
    # COCOEvaluator only reports the tasks present in the predictions ("segm" needs some detections).
    ap = {task: results.get(task, {}).get("AP", float("nan")) for task in ("bbox", "segm")}
    return cfg.SOLVER.MAX_ITER, ap["bbox"], ap["segm"], train_seconds


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--max-iter", type=int, default=0, help="iteration budget (0: the configs' own)")
    parser.add_argument("--eval-dataset", default="synthetic_shapes_val")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch threads on CPU (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, config) in enumerate(MODELS):
            rows.append((name, *train_and_evaluate(config, args.max_iter, args.eval_dataset,
                                                   os.path.join(tmp, str(i)), args.device)))
    baseline_mask_ap = rows[0][3]
    print("| model | iterations | box AP | mask AP | mask AP - baseline | train s |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, iters, box_ap, mask_ap, seconds in rows:
        print(f"| {name} | {iters} | {box_ap:.1f} | {mask_ap:.1f} | {mask_ap - baseline_mask_ap:+.1f} | {seconds:.0f} |")
    print(f"\ncommand: {benchmark.command_line()}")
    print(f"machine: {benchmark.machine_description(args.device)}")


if __name__ == "__main__":
    main()
