#!/usr/bin/env python
"""Learning benchmark: BlendMask vs Detectron2's Mask R-CNN, both quick-start models (ResNet-18-FPN, from
scratch) trained on the built-in synthetic shapes with the same iteration budget and evaluated with COCO
box / mask AP in the same run. The issue's bar: BlendMask's mask AP within 5 points of Mask R-CNN's.

    python benchmarks/blendmask_learning.py                       # quick-start schedule (700 iterations)
    python benchmarks/blendmask_learning.py --max-iter 300 --threads 2

A script, not a test: the default budget takes tens of minutes per model on a CPU. Training, evaluation
and the table are ``d2ext.benchmark.learning_benchmark_main``'s.
"""
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from d2ext.benchmark import learning_benchmark_main  # noqa: E402

MODELS = [("Mask R-CNN R18-FPN (baseline)", "configs/quickstart/mask_rcnn_R18_FPN_synthetic.yaml"),
          ("BlendMask R18-FPN", "configs/quickstart/blendmask_R18_synthetic.yaml")]

if __name__ == "__main__":
    learning_benchmark_main([(name, os.path.join(REPO, config)) for name, config in MODELS], __doc__.split("\n")[0])
