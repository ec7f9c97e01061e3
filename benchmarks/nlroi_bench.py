#!/usr/bin/env python
"""NL-RoI overhead against the plain GN Mask R-CNN, measured in the same run; prints four tables with
ratios, the command and the machine.

1. Whole model: NL-RoI Mask R-CNN R-50-FPN-GN vs the plain GN model (``configs/NL-RoI/*_1x.yaml``),
   inference and one training step, at ``--size`` with ``--proposals`` RPN proposals per image; then
   (inference) the two models' ROI heads alone on the same features and proposals, and their extra
   time as a share of the plain model's inference.
2. The NL-RoI block alone (D = 256, Df = 64, Dg = 32, 7 x 7 RoIs of one image) vs the plain GN box head
   (4 conv + 1 fc) on the same N RoIs, for N in ``--rois``.
3. Soft-NMS (linear) + box voting vs Detectron2's per-class hard NMS on ``--proposals`` boxes x 80
   classes, as a share of the NL-RoI model's inference time from table 1.

    python benchmarks/nlroi_bench.py                      # 800 x 1333, 1000 proposals (the issue's setting)
    python benchmarks/nlroi_bench.py --size 256 400 --iters 2 --rois 0 1 100 500 --threads 1

Models are randomly initialised (no downloads). ``ROI_HEADS.SCORE_THRESH_TEST`` is 0 for both models so
that a random model still sends ``TEST.DETECTIONS_PER_IMAGE`` detections through the mask head, as a
trained one does.
"""
import argparse
import os
import statistics

import torch

import d2ext  # noqa: F401  (built-in datasets)
import nlroi_d2
from d2ext import benchmark
from d2ext.engine import setup_cfg
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_model
from detectron2.modeling.roi_heads import build_box_head
from detectron2.modeling.roi_heads.fast_rcnn import fast_rcnn_inference

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PLAIN = os.path.join(REPO, "configs/NL-RoI/mask_rcnn_R_50_FPN_GN_plain_1x.yaml")
NLROI = os.path.join(REPO, "configs/NL-RoI/mask_rcnn_R_50_FPN_GN_nlroi_1x.yaml")
# Issue 3's targets, at 800 x 1333 with 1000 proposals: inference and training-step overheads of NL-RoI over
# the plain GN model, and the share of Soft-NMS + box voting in NL-RoI inference (all at most).
INFERENCE_OVERHEAD_TARGET = 0.05
TRAIN_OVERHEAD_TARGET = 0.10
POSTPROCESS_SHARE_TARGET = 0.03


def model_cfg(config_file, args):
    return setup_cfg(config_file, [
        "MODEL.WEIGHTS", "", "MODEL.DEVICE", args.device, "MODEL.RPN.POST_NMS_TOPK_TEST", args.proposals,
        "MODEL.RPN.PRE_NMS_TOPK_TEST", max(args.proposals, 1000), "MODEL.ROI_HEADS.SCORE_THRESH_TEST", 0.0,
    ], freeze=False)


def ratio_table(header, rows):
    """rows: (label, baseline seconds, seconds[, median of per-round ratios]); prints medians in ms,
    seconds / baseline, and the per-round ratios' median where given."""
    paired = any(len(row) == 4 for row in rows)
    lines = [f"| {header} | baseline ms | NL-RoI ms | x baseline |" + (" median of per-round ratios |" if paired else ""),
             "| --- | --- | --- | --- |" + (" --- |" if paired else "")]
    for label, base, value, *paired_ratio in rows:
        line = f"| {label} | {base * 1e3:.1f} | {value * 1e3:.1f} | {value / base:.3f} |"
        lines.append(line + (f" {paired_ratio[0]:.3f} |" if paired_ratio else (" - |" if paired else "")))
    return "\n".join(lines)


def whole_model_rows(args):
    """[(mode, plain seconds, NL-RoI seconds, median of the per-round ratios)] for inference and one
    training step; the two models run alternately (``interleaved_seconds``), so that load changes on a
    shared machine fall on both."""
    plain_cfg, nl_cfg = model_cfg(PLAIN, args), model_cfg(NLROI, args)
    batch = benchmark.synthetic_batch(plain_cfg, 1, args.size[0], args.size[1])
    rows = []
    for mode in args.modes:
        steps = [benchmark.model_step(plain_cfg, mode, batch), benchmark.model_step(nl_cfg, mode, batch)]
        times = benchmark.interleaved_seconds(steps, args.device, args.warmup, args.iters)
        (plain, nl), (ratios,) = times, benchmark.per_round_ratios(times)
        rows.append((mode, statistics.median(plain), statistics.median(nl), statistics.median(ratios)))
    return rows


def heads_rows(args):
    """[("inference", plain seconds, NL-RoI seconds, median of the per-round ratios)] of the two models'
    ROI heads alone, alternately, on the same backbone features and proposals (the plain model's): the
    only modules in which the two models differ, without the noise of timing the identical rest."""
    models = []
    for config_file in (PLAIN, NLROI):
        torch.manual_seed(0)
        models.append(build_model(model_cfg(config_file, args)).to(args.device).eval())
    plain_model = models[0]
    batch = benchmark.synthetic_batch(model_cfg(PLAIN, args), 1, args.size[0], args.size[1])
    with torch.no_grad():
        images = plain_model.preprocess_image(batch)
        features = plain_model.backbone(images.tensor)
        proposals, _ = plain_model.proposal_generator(images, features, None)
        steps = [lambda model=model: model.roi_heads(images, features, proposals) for model in models]
        times = benchmark.interleaved_seconds(steps, args.device, args.warmup, args.iters)
    (plain, nl), (ratios,) = times, benchmark.per_round_ratios(times)
    return [("inference", statistics.median(plain), statistics.median(nl), statistics.median(ratios))]


def block_rows(args):
    """[(N, plain box head seconds, block seconds)] for one image's N RoIs, inference."""
    cfg = model_cfg(PLAIN, args)
    shape = ShapeSpec(channels=cfg.MODEL.FPN.OUT_CHANNELS, height=7, width=7)
    torch.manual_seed(0)
    head = build_box_head(cfg, shape).to(args.device).eval()
    block = nlroi_d2.NLRoIBlock(shape.channels, cfg.MODEL.NL_ROI.EMBED_CHANNELS,
                                cfg.MODEL.NL_ROI.G_CHANNELS).to(args.device).eval()
    rows = []
    for n in args.rois:
        x = torch.randn(n, shape.channels, 7, 7, device=args.device)
        with torch.no_grad():
            base = benchmark.median_seconds(lambda: head(x), args.device, args.warmup, args.iters)
            value = benchmark.median_seconds(lambda: block(x, [n]), args.device, args.warmup, args.iters)
        rows.append((f"N = {n}", base, value))
    return rows


def postprocess_inputs(num_proposals, num_classes, image_size, device, seed=0):
    """Class-specific boxes (R, 80*4) in clusters (so NMS / voting have overlaps) and softmax scores
    (R, 81) peaked on a few classes per proposal, on an image of ``image_size`` (H, W); box sizes scale
    with the image (40-240 px at 800 x 1333)."""
    g = torch.Generator().manual_seed(seed)
    height, width = image_size
    centres = torch.rand(50, 2, generator=g) * torch.tensor([float(width), float(height)])
    centre = centres[torch.randint(0, 50, (num_proposals,), generator=g)]
    scale = min(height, width) / 800
    size = scale * (40 + 200 * torch.rand(num_proposals, 1, 2, generator=g))
    jitter = scale * 15 * torch.randn(num_proposals, num_classes, 2, generator=g)
    mid = centre[:, None, :] + jitter
    boxes = torch.cat([mid - size / 2, mid + size / 2], dim=2).reshape(num_proposals, -1)
    scores = torch.softmax(4 * torch.randn(num_proposals, num_classes + 1, generator=g), dim=1)
    return boxes.to(device), scores.to(device)


def postprocess_rows(args, nl_inference_seconds):
    """[(label, hard-NMS seconds, Soft-NMS + voting seconds)] and the candidate count."""
    cfg = model_cfg(NLROI, args)
    size = tuple(args.size)  # the image of the model's inference time, of which the share is taken
    boxes, scores = postprocess_inputs(args.proposals, 80, size, args.device)
    score_thresh = 0.05  # the configs' test threshold, not the 0 used for the random models
    nms, topk = cfg.MODEL.ROI_HEADS.NMS_THRESH_TEST, cfg.TEST.DETECTIONS_PER_IMAGE
    settings = nlroi_d2.PostprocessSettings(soft_nms=True, box_vote=True, box_vote_iou_threshold=0.9)

    def hard():
        fast_rcnn_inference([boxes], [scores], [size], score_thresh, nms, topk)

    def soft():
        nlroi_d2.fast_rcnn_inference_soft([boxes], [scores], [size], score_thresh, nms, topk, settings)

    base = benchmark.median_seconds(hard, args.device, args.warmup, args.iters)
    value = benchmark.median_seconds(soft, args.device, args.warmup, args.iters)
    candidates = int((scores[:, :-1] > score_thresh).sum())
    rows = [(f"{args.proposals} x 80 ({candidates} above {score_thresh})", base, value)]
    share = value / nl_inference_seconds if nl_inference_seconds else None
    return rows, share


def main():
    parser = argparse.ArgumentParser(description="NL-RoI overhead vs the plain GN Mask R-CNN.")
    parser.add_argument("--proposals", type=int, default=1000)
    parser.add_argument("--rois", nargs="+", type=int, default=[0, 1, 100, 500, 1000, 2000])
    parser.add_argument("--modes", nargs="+", default=["inference", "train"], choices=["inference", "train"])
    benchmark.add_timing_arguments(parser, warmup=1)
    args = parser.parse_args()
    benchmark.use_threads(args.threads)

    models = whole_model_rows(args)
    heads = heads_rows(args) if "inference" in args.modes else []
    blocks = block_rows(args)
    nl_inference = next((nl for mode, _, nl, _ in models if mode == "inference"), None)
    post, share = postprocess_rows(args, nl_inference)

    conclusive = tuple(args.size) == benchmark.TARGET_SIZE and args.proposals == 1000
    print(f"command: {benchmark.command_line()}")
    print(f"machine: {benchmark.machine_description(args.device, args.threads)}")
    print(f"input: {args.size[0]}x{args.size[1]}, batch 1, {args.proposals} proposals, "
          f"median of {args.iters} after {args.warmup} warm-up\n")
    print("Whole model (baseline: mask_rcnn_R_50_FPN_GN_plain_1x.yaml; the two models run alternately)")
    print(ratio_table("mode", models))
    if heads:
        print("\nROI heads alone, on the same features and proposals (baseline: the plain model's heads; alternately)")
        print(ratio_table("mode", heads))
        plain_inference = next(plain for mode, plain, _, _ in models if mode == "inference")
        _, plain_heads, nl_heads, _ = heads[0]
        heads_share = (nl_heads - plain_heads) / plain_inference
        print(f"NL-RoI heads' extra time as a share of the plain model's inference: {100 * heads_share:.1f} %: "
              f"{benchmark.verdict(heads_share, INFERENCE_OVERHEAD_TARGET, conclusive=conclusive)} "
              f"(target <= {100 * INFERENCE_OVERHEAD_TARGET:.0f} %)")
    train_ratio = next((ratio for mode, _, _, ratio in models if mode == "train"), None)
    if train_ratio is not None:
        print(f"NL-RoI training step / plain (median of per-round ratios): {train_ratio:.3f}: "
              f"{benchmark.verdict(train_ratio - 1, TRAIN_OVERHEAD_TARGET, conclusive=conclusive)} "
              f"(target <= +{100 * TRAIN_OVERHEAD_TARGET:.0f} %)")
    print("\nNL-RoI block alone (baseline: the plain GN box head on the same RoIs)")
    print(ratio_table("RoIs of one image", blocks))
    print("\nPost-processing (baseline: Detectron2's hard NMS)")
    print(ratio_table("proposals x classes", post))
    if share is not None:
        print(f"\nSoft-NMS + voting share of NL-RoI inference: {100 * share:.1f} %: "
              f"{benchmark.verdict(share, POSTPROCESS_SHARE_TARGET, conclusive=conclusive)} "
              f"(target <= {100 * POSTPROCESS_SHARE_TARGET:.0f} %)")


if __name__ == "__main__":
    main()
