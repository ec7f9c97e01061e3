#!/usr/bin/env python
"""Learning benchmark: every method's quick-start model vs Detectron2's Mask R-CNN quick-start model, all
trained from scratch on the built-in synthetic shapes with the same iteration budget and evaluated with
COCO box / mask AP in the same run. The issues' bar: each method's mask AP within 5 points of Mask R-CNN's.

    python benchmarks/learning.py                                   # all models, the configs' 700 iterations
    python benchmarks/learning.py --jobs 2 --threads 1 --output-dir output/learning
    python benchmarks/learning.py --models condinst blendmask --max-iter 300
    python benchmarks/learning.py --device cuda --jobs 16 --threads 1 --seeds 42 7 1   # mean of 3 runs per model

A script, not a test: the default budget takes about ten minutes per model on 2 CPU cores. One run per model
can differ from a rerun of the same config by several AP points (twelfth session, H100: up to 20 for the
stride-2 BlendMask), so a verdict on the 5-point bar needs ``--seeds``. Training,
evaluation and the table are ``d2ext.benchmark.learning_benchmark_main``'s.
"""
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from d2ext.benchmark import learning_benchmark_main  # noqa: E402

# (name for --models, quick-start config); the first is the baseline.
MODELS = [
    ("mask_rcnn", "configs/quickstart/mask_rcnn_R18_FPN_synthetic.yaml"),
    ("nlroi", "configs/quickstart/nlroi_mask_rcnn_R18_FPN_synthetic.yaml"),
    ("condinst", "configs/quickstart/condinst_R18_synthetic.yaml"),
    ("blendmask", "configs/quickstart/blendmask_R18_synthetic.yaml"),
    ("blendmask_stride2", "configs/quickstart/blendmask_R18_synthetic_stride2.yaml"),
    ("solo", "configs/quickstart/solo_R18_FPN_synthetic.yaml"),
    ("solov2", "configs/quickstart/solov2_R18_FPN_synthetic.yaml"),
    ("solov2_bn_stride2", "configs/quickstart/solov2_R18_FPN_synthetic_bn_stride2.yaml"),
    ("solov2_bn_stride2_relcoords", "configs/quickstart/solov2_R18_FPN_synthetic_bn_stride2_relcoords.yaml"),
    ("solov2_bn_stride2_relcoords_refgrids",
     "configs/quickstart/solov2_R18_FPN_synthetic_bn_stride2_relcoords_refgrids.yaml"),
    ("rdsnet", "configs/quickstart/rdsnet_R18_FPN_synthetic.yaml"),
    ("rdsnet_stride2", "configs/quickstart/rdsnet_R18_FPN_synthetic_stride2.yaml"),
    ("rdsnet_stride2_p2p6", "configs/quickstart/rdsnet_R18_FPN_synthetic_stride2_p2p6.yaml"),
    ("rdsnet_fcos", "configs/quickstart/rdsnet_fcos_R18_synthetic.yaml"),
    ("rdsnet_fcos_stride2_p2p6", "configs/quickstart/rdsnet_fcos_R18_synthetic_stride2_p2p6.yaml"),
    ("rdsnet_fcos_stride2_p2p6_boxterms", "configs/quickstart/rdsnet_fcos_R18_synthetic_stride2_p2p6_boxterms.yaml"),
]

if __name__ == "__main__":
    learning_benchmark_main([(name, os.path.join(REPO, config)) for name, config in MODELS], __doc__.split("\n")[0])
