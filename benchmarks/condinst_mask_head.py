#!/usr/bin/env python
"""CondInst's dynamic mask head for N instances vs Detectron2 Mask R-CNN's mask head for N RoIs, at the
feature sizes of one 800 x 1333 image (the CondInst paper's claim: the dynamic head costs a fraction of
Mask R-CNN's). Prints a table with the Mask R-CNN baseline measured in the same run, the ratios, the command
and the machine.

    python benchmarks/condinst_mask_head.py                      # CPU, 100 instances
    python benchmarks/condinst_mask_head.py --device cuda --instances 100 --iters 50

Rows: Mask R-CNN = ROIAlign of the RoIs from P2-P5 + its 4-conv / deconv / predictor head (R50-FPN 1x);
CondInst dynamic head = relative coordinates + the instances' dynamic convs (one grouped conv per layer)
+ aligned x2 upsampling to stride 4; CondInst mask branch = the per-image branch (P3-P5 -> 8 channels),
shared by all instances, shown separately and added in the last row. Random weights and features.
"""
import argparse
import os
import sys

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import adet_lite  # noqa: E402,F401  (registration)
from d2ext import benchmark  # noqa: E402
from d2ext.engine import setup_cfg  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402
from detectron2.structures import Boxes, Instances  # noqa: E402

# Issue 4: the dynamic mask head's time / Mask R-CNN's mask head's, at most, for 100 instances of an 800 x 1333
# image (padded to 800 x 1344).
DYNAMIC_HEAD_TARGET = 0.5
TARGET_INSTANCES = 100
TARGET_PADDED_SIZE = (800, 1344)


def random_boxes(n, height, width, generator):
    xy = torch.rand(n, 2, generator=generator) * torch.tensor([width * 0.8, height * 0.8])
    wh = torch.rand(n, 2, generator=generator) * torch.tensor([width * 0.3, height * 0.3]) + 16
    return torch.cat((xy, xy + wh), dim=1)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--instances", type=int, default=TARGET_INSTANCES)
    benchmark.add_timing_arguments(parser, size=TARGET_PADDED_SIZE, warmup=3, iters=10, device="cpu",
                                   size_help="padded input size")
    args = parser.parse_args()
    benchmark.use_threads(args.threads)
    device, n = args.device, args.instances
    height, width = args.size
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)

    d2_cfg = benchmark.baseline_cfg()
    d2_cfg.MODEL.WEIGHTS, d2_cfg.MODEL.DEVICE = "", device
    mask_rcnn = build_model(d2_cfg).eval()
    features = {f"p{level}": torch.randn(1, 256, height // 2 ** level, width // 2 ** level, device=device)
                for level in range(2, 8)}
    proposals = Instances((height, width))
    proposals.pred_boxes = Boxes(random_boxes(n, height, width, generator).to(device))
    roi_heads = mask_rcnn.roi_heads
    roi_features = [features[f] for f in roi_heads.mask_in_features]

    def mask_rcnn_head():
        with torch.no_grad():
            return roi_heads.mask_head.layers(roi_heads.mask_pooler(roi_features, [proposals.pred_boxes]))

    cfg = setup_cfg(os.path.join(REPO, "configs/CondInst/MS_R_50_1x.yaml"),
                    ["MODEL.WEIGHTS", "", "MODEL.DEVICE", device])
    condinst = build_model(cfg).eval()
    head, branch = condinst.mask_head, condinst.mask_branch
    with torch.no_grad():
        mask_feats, _ = branch(features)
    instances = Instances((0, 0))
    instances.im_inds = torch.zeros(n, dtype=torch.int64, device=device)
    boxes = random_boxes(n, height, width, generator)
    instances.locations = ((boxes[:, :2] + boxes[:, 2:]) / 2).to(device)
    instances.fpn_levels = torch.randint(0, 5, (n,), generator=generator).to(device)
    instances.mask_head_params = (torch.randn(n, head.num_params, generator=generator) * 0.1).to(device)

    def dynamic_head():
        with torch.no_grad():
            return head(mask_feats, branch.out_stride, instances)

    def mask_branch():
        with torch.no_grad():
            return branch(features)

    rows = [("Mask R-CNN mask head (ROIAlign + head)", benchmark.median_seconds(mask_rcnn_head, device, args.warmup, args.iters)),
            ("CondInst dynamic mask head", benchmark.median_seconds(dynamic_head, device, args.warmup, args.iters)),
            ("CondInst mask branch (per image)", benchmark.median_seconds(mask_branch, device, args.warmup, args.iters))]
    rows.append(("CondInst dynamic head + mask branch", rows[1][1] + rows[2][1]))
    baseline = rows[0][1]
    print(f"| {n} instances, input {height}x{width} | median ms | x Mask R-CNN |")
    print("| --- | --- | --- |")
    for name, seconds in rows:
        print(f"| {name} | {seconds * 1000:.2f} | {seconds / baseline:.2f} |")
    dynamic_ratio = rows[1][1] / baseline
    conclusive = (height, width) == TARGET_PADDED_SIZE and n == TARGET_INSTANCES
    target_case = f"{TARGET_INSTANCES} instances at {TARGET_PADDED_SIZE[0]}x{TARGET_PADDED_SIZE[1]}"
    outcome = benchmark.verdict(dynamic_ratio, DYNAMIC_HEAD_TARGET, conclusive=conclusive, why_not=f"not {target_case}")
    print(f"\nCondInst dynamic mask head / Mask R-CNN mask head: {dynamic_ratio:.2f}: {outcome} "
          f"(issue target <= {DYNAMIC_HEAD_TARGET})")
    print(f"command: {benchmark.command_line()}")
    print(f"machine: {benchmark.machine_description(device)}")


if __name__ == "__main__":
    main()
