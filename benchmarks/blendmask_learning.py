#!/usr/bin/env python
"""Learning benchmark: BlendMask vs Detectron2's Mask R-CNN, both quick-start models (ResNet-18-FPN, from
scratch) trained on the built-in synthetic shapes with the same iteration budget and evaluated with COCO
box / mask AP in the same run. The issue's bar: BlendMask's mask AP within 5 points of Mask R-CNN's.

    python benchmarks/blendmask_learning.py                       # quick-start schedule (700 iterations)
    python benchmarks/blendmask_learning.py --max-iter 300 --threads 2

A script, not a test: the default budget takes tens of minutes per model on a CPU. Training and
evaluation are benchmarks/condinst_learning.py's.
"""
import argparse
import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from condinst_learning import train_and_evaluate  # noqa: E402
from d2ext import benchmark  # noqa: E402

MODELS = [("Mask R-CNN R18-FPN (baseline)", "configs/quickstart/mask_rcnn_R18_FPN_synthetic.yaml"),
          ("BlendMask R18-FPN", "configs/quickstart/blendmask_R18_synthetic.yaml")]


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
