#!/usr/bin/env python
"""End-to-end speed of BlendMask vs Detectron2's Mask R-CNN R50-FPN, both measured in the same run.

    python benchmarks/blendmask_bench.py                                   # 800 x 1333, inference
    python benchmarks/blendmask_bench.py --size 320 533 --threads 1 --iters 3 --modes inference train

The issue's bar (the BlendMask paper: 20 % faster than Mask R-CNN): BlendMask R-50 1x inference
<= 0.85x Mask R-CNN's time at 800 x 1333. Models are randomly initialised; both run with a zero score
threshold so that each post-processes (and predicts masks for) its full 100 detections, instead of
random weights leaving one of them with nothing to do. Each (model, mode) runs in its own process
(``benchmarks/speed.py``), so peak memory belongs to that measurement alone.
"""
import argparse
import os
import sys

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from detectron2 import model_zoo  # noqa: E402

from d2ext.benchmark import BASELINE_CONFIG, command_line, format_table, machine_description  # noqa: E402
from speed import measure_isolated  # noqa: E402

BASELINE = "detectron2 mask_rcnn_R_50_FPN_1x"
BLENDMASK = "configs/BlendMask/R_50_1x.yaml"
TARGET_RATIO = 0.85


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config-file", default=BLENDMASK, help="the BlendMask config")
    parser.add_argument("--modes", nargs="+", default=["inference"], choices=["inference", "train"])
    parser.add_argument("--size", nargs=2, type=int, default=[800, 1333], metavar=("MIN", "MAX"))
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()

    models = [(BASELINE, model_zoo.get_config_file(BASELINE_CONFIG), ["MODEL.ROI_HEADS.SCORE_THRESH_TEST", 0.0]),
              (args.config_file, os.path.join(REPO, args.config_file), ["MODEL.FCOS.INFERENCE_TH_TEST", 0.0])]
    rows = []
    for name, config_file, opts in models:
        for mode in args.modes:
            seconds, memory = measure_isolated(config_file, opts, mode, args)
            rows.append({"name": name, "mode": mode, "seconds": seconds, "memory_mb": memory})
            print(f"{name} {mode}: {seconds:.3f} s, {memory:.0f} MB", file=sys.stderr, flush=True)
    print(f"command: {command_line()}")
    print(f"machine: {machine_description(args.device, args.threads)}")
    print(f"input: {args.size[0]}x{args.size[1]} (short x max side), batch {args.batch_size}, "
          f"median of {args.iters} after {args.warmup} warm-up")
    print(format_table(rows, BASELINE))
    times = {(r["name"], r["mode"]): r["seconds"] for r in rows}
    if "inference" in args.modes:
        ratio = times[(args.config_file, "inference")] / times[(BASELINE, "inference")]
        # The target is stated for 800x1333; other sizes and CPUs are indicative only.
        print(f"BlendMask / Mask R-CNN inference time: {ratio:.2f} (issue target <= {TARGET_RATIO} at 800x1333; "
              f"this run: {args.size[0]}x{args.size[1]} on {args.device})")


if __name__ == "__main__":
    main()
