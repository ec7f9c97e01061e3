#!/usr/bin/env python
"""SOLO family benchmarks (issue 6), each comparison against its baseline measured in the same run:
Decoupled SOLO's inference peak memory and latency vs SOLO, Matrix NMS vs greedy mask NMS on 500 masks
(greedy NMS run three ways: the references', per kept mask, and the package's), and SOLOv2's end-to-end
inference latency and arithmetic (GFLOP: convolutions and matrix products) vs Detectron2's Mask R-CNN R50-FPN.

    python benchmarks/solo_bench.py                                          # 800 x 1333, CPU
    python benchmarks/solo_bench.py --size 256 448 --warmup 1 --iters 2 --threads 1   # a quick check

Targets: Decoupled SOLO inference peak memory <= 0.5x SOLO's; Matrix NMS >= 10x faster than greedy mask
NMS at 500 masks; SOLOv2 vs Mask R-CNN is reported (no target). They are stated for 800 x 1333; other
sizes are indicative only.

Models are R-50-FPN with random weights (no downloads), each in its own process, so that a peak (RSS on
CPU, max allocated on CUDA) is its own; peaks are taken over full inference passes (``torch.no_grad``,
eval mode) after a reset. Every model sees one image tensor of exactly H x W (--size; a built-in
synthetic image stretched to that size; it is also the "original" size, so masks are returned at H x W).

Random weights would leave the SOLO models with nothing to do: their category scores sit at the prior
(about 0.01, below SCORE_THR 0.1) and their mask probabilities too (below MASK_THR 0.5, so the area filter
would drop every mask). So, per model, SCORE_THR is set to the value that lets exactly --candidates grid
cells of the benchmark image through (the same as passing ``MODEL.SOLO.SCORE_THR <that value>``; the
script prints it), MASK_THR and UPDATE_THR are 0 (every candidate mask is non-empty and survives: all
post-processing runs on dense tensors, so its cost does not depend on the masks' content): masks are
formed for --candidates cells, Matrix NMS runs on them (500 is NMS_PRE) and 100 detections are returned
(their masks are formed once more, so "masks formed" counts --candidates + 100).
Mask R-CNN runs with a zero score threshold (up to 100 detections), as in the other benchmarks.

Memory columns: "inference MB" is the peak of the full inference passes above the memory in use before
them (the loaded model, the input and, on CPU, the Python / PyTorch runtime that the whole-process peak
also counts); "forward only" is the same for the first pass of the process without post-processing
(backbone + branches: where the variants differ; the first pass also counts one-time allocations); on CPU, RSS is only approximate for such differences
(the allocator keeps some freed memory). decoupled_solo_light_R50_3x runs at --size too, not at its
config's 512 x 852 test size.

Greedy mask NMS: the SOLO and AdelaiDet code (the SOLOv2 paper's comparison) visits the pairs in a Python
loop; a torchvision-style greedy NMS computes one IoU row per kept mask; the package's ``mask_nms`` computes
the same-label IoUs as ``matrix_nms`` does (on a CPU one product per label, elsewhere the whole matrix in one),
leaving only a loop over booleans (the NMS table shows those shared IoUs on their own). All three keep the same
masks (checked). --nms-classes sets how many labels the masks have (4 like the built-in data; COCO has 80).
"""
import argparse
import dataclasses
import gc
import math
import multiprocessing as mp
import os
import sys
from concurrent.futures import ProcessPoolExecutor

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

BASELINE = "detectron2 mask_rcnn_R_50_FPN_1x"
SOLO = "solo_R50_1x"
DECOUPLED = "decoupled_solo_R50_1x"
SOLOV2 = "SOLOv2_R50_1x"
# name -> (config: Detectron2's model-zoo baseline (None) or a file under configs/, its MODEL.<node>)
MODELS = {
    BASELINE: (None, None),
    SOLO: ("SOLO/solo_R50_1x.yaml", "SOLO"),
    DECOUPLED: ("SOLO/decoupled_solo_R50_1x.yaml", "SOLO"),
    "decoupled_solo_light_R50_3x": ("SOLO/decoupled_solo_light_R50_3x.yaml", "SOLO"),
    SOLOV2: ("SOLO/SOLOv2_R50_1x.yaml", "SOLOV2"),
}
DECOUPLED_MEMORY_TARGET = 0.5  # Decoupled SOLO / SOLO inference peak memory, at most
MATRIX_NMS_TARGET = 10.0  # greedy mask NMS time / Matrix NMS time, at least


def exact_size_input(cfg, height, width):
    """One inference input of exactly ``height`` x ``width`` (``d2ext.benchmark.synthetic_batch``), no
    annotations."""
    from d2ext.benchmark import synthetic_batch

    inputs = synthetic_batch(cfg, 1, height, width)[0]
    return [{key: inputs[key] for key in ("image", "height", "width")}]


def _tensor_mb(outputs):
    """Total size of the tensors in a (nested) list / tuple."""
    if isinstance(outputs, torch.Tensor):
        return outputs.numel() * outputs.element_size() / 2**20
    return sum(_tensor_mb(o) for o in outputs)


def force_candidates(model, inputs, count, device):
    """Set a SOLO-family model's score threshold so that exactly ``count`` (cell, class) candidates of
    ``inputs`` (one image) pass it (fewer when fewer scores are positive), from one forward pass without
    post-processing (backbone + branches), whose memory is measured on the way.

    Returns: dict of the threshold, the candidates, the forward pass's peak memory above what was in use
    before it and the size of the mask branch's outputs (MB).
    """
    from adet_lite.solo import point_nms
    from d2ext import benchmark

    gc.collect()
    with torch.no_grad():
        before = benchmark.current_memory_mb(device)
        benchmark.reset_peak_memory(device)
        _, category_logits, mask_outputs = model._run_branches(inputs)
        forward_mb = benchmark.peak_memory_mb(device) - before
        mask_output_mb = _tensor_mb(mask_outputs)
        del mask_outputs
        scores = torch.cat([point_nms(x.sigmoid()).flatten() for x in category_logits])
    ranked = scores.sort(descending=True).values
    threshold = 0.0
    if count < int((ranked > 0).sum()):
        threshold = float((ranked[count - 1] + ranked[count]) / 2) if count > 0 else float(ranked[0])
    model.inference_params = dataclasses.replace(model.inference_params, score_threshold=threshold)
    return {"score_threshold": threshold, "candidates": int((scores > threshold).sum()), "forward_mb": forward_mb,
            "mask_output_mb": mask_output_mb}


def measure_model(name, args):
    """In a fresh process: latency, memory before inference, peak memory of inference, GFLOP of one
    inference (``d2ext.benchmark.inference_gflops``), masks formed and detections of one model."""
    import d2ext  # noqa: F401  (datasets)
    from d2ext import benchmark
    from d2ext.engine import setup_cfg
    from detectron2 import model_zoo
    from detectron2.modeling import build_model

    benchmark.use_threads(args.threads)
    config, node = MODELS[name]
    opts = ["MODEL.WEIGHTS", "", "MODEL.DEVICE", args.device]
    if node is None:
        config_file = model_zoo.get_config_file(benchmark.BASELINE_CONFIG)
        opts += ["MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0"]
    else:
        config_file = os.path.join(REPO, "configs", config)
        opts += [f"MODEL.{node}.MASK_THR", "0.0", f"MODEL.{node}.UPDATE_THR", "0.0"]
    cfg = setup_cfg(config_file, opts)
    inputs = exact_size_input(cfg, *args.size)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    result = {"score_threshold": None, "candidates": None, "masks_formed": None}
    formed = []
    if node is not None:
        result.update(force_candidates(model, inputs, args.candidates, args.device))
        mask_probs = model.mask_branch.mask_probs

        def counting_mask_probs(*a, **k):  # counts the masks inference forms (first pass only)
            masks = mask_probs(*a, **k)
            formed.append(masks.shape[0])
            return masks

        model.mask_branch.mask_probs = counting_mask_probs
    gc.collect()
    with torch.no_grad():
        result["before_mb"] = benchmark.current_memory_mb(args.device)
        if not benchmark.reset_peak_memory(args.device):
            print("warning: the CPU peak could not be reset; peaks include model building", file=sys.stderr)
        outputs = model(inputs)
        if node is not None:
            model.mask_branch.mask_probs = mask_probs
            result["masks_formed"] = sum(formed)
        result["detections"] = len(outputs[0]["instances"])
        del outputs
        result["seconds"] = benchmark.median_seconds(lambda: model(inputs), args.device, args.warmup, args.iters)
        result["peak_mb"] = benchmark.peak_memory_mb(args.device)
        # Counted after the memory reading: the counting call holds extra tensors.
        result["gflops"] = benchmark.inference_gflops(lambda: model(inputs))
    return result


def overlapping_blobs(num_masks, height, width, num_classes, num_objects, seed=0):
    """``num_masks`` binary ellipses, each a jittered copy (centre +-20 % of the radii, radii +-20 %) of
    one of ``num_objects`` objects, so that like SOLO's candidates several masks cover each object and
    objects overlap; labels: the object's class; scores: uniform. -> (masks (N, H, W) bool, labels, scores)."""
    g = torch.Generator().manual_seed(seed)
    size = torch.tensor([height, width], dtype=torch.float32)
    centres = torch.rand(num_objects, 2, generator=g) * size
    radii = (0.03 + 0.15 * torch.rand(num_objects, 2, generator=g)) * size
    object_classes = torch.randint(num_classes, (num_objects,), generator=g)
    which = torch.randint(num_objects, (num_masks,), generator=g)
    jitter = 0.4 * (torch.rand(num_masks, 4, generator=g) - 0.5)
    centre = centres[which] + jitter[:, :2] * radii[which]
    radius = radii[which] * (1 + jitter[:, 2:])
    ys = torch.arange(height, dtype=torch.float32)[None, :, None]
    xs = torch.arange(width, dtype=torch.float32)[None, None, :]
    masks = (((ys - centre[:, 0, None, None]) / radius[:, 0, None, None]) ** 2
             + ((xs - centre[:, 1, None, None]) / radius[:, 1, None, None]) ** 2) <= 1
    return masks, object_classes[which], torch.rand(num_masks, generator=g)


def pairwise_greedy_mask_nms(masks, labels, scores, iou_threshold=0.5):
    """Greedy mask NMS the way the SOLO and AdelaiDet code bases implement it (their ``mask_nms``; written
    here from that description): masks by decreasing score, and for each surviving mask a Python loop over
    the later surviving masks of its class, one IoU (a product of two masks) per pair. -> kept indices."""
    order = torch.argsort(scores, descending=True, stable=True)
    masks, labels = masks[order].float(), labels[order]
    areas = masks.flatten(1).sum(dim=1)
    keep = [True] * len(order)
    for i in range(len(order)):
        if not keep[i]:
            continue
        for j in range(i + 1, len(order)):
            if keep[j] and labels[i] == labels[j]:
                intersection = (masks[i] * masks[j]).sum()
                if intersection / (areas[i] + areas[j] - intersection).clamp(min=1) > iou_threshold:
                    keep[j] = False
    return order[torch.tensor(keep, dtype=torch.bool)]


def rowwise_greedy_mask_nms(masks, labels, scores, iou_threshold=0.5):
    """Greedy mask NMS vectorised per step, like torchvision's box NMS: for each surviving mask, the IoUs
    with all later masks in one matrix-vector product, without forming the full IoU matrix. -> kept indices."""
    order = torch.argsort(scores, descending=True, stable=True)
    flat, labels = masks[order].flatten(1).float(), labels[order]
    areas = flat.sum(dim=1)
    suppressed = torch.zeros(len(order), dtype=torch.bool, device=scores.device)
    for i in range(len(order)):
        if suppressed[i]:
            continue
        intersection = flat[i + 1:] @ flat[i]
        iou = intersection / (areas[i] + areas[i + 1:] - intersection).clamp(min=1)
        suppressed[i + 1:] |= (iou > iou_threshold) & (labels[i + 1:] == labels[i])
    return order[~suppressed]


GREEDY = "adet_lite greedy mask_nms (IoU 0.5; the same-label IoUs as Matrix NMS)"
ROWWISE = "greedy, one IoU row per kept mask (torchvision-NMS style)"
PAIRWISE = "greedy as in SOLO / AdelaiDet (Python loop over pairs)"
PAIRWISE_MAX_ITERS = 3  # its loop takes seconds per call: fewer repetitions
MATRIX = "adet_lite.matrix_nms (gaussian, sigma 2)"


def measure_nms(args):
    """Median seconds of Matrix NMS, the package's greedy mask NMS, the two ways the references and
    torchvision-style code run greedy NMS, and the mask IoU matrix that Matrix NMS and the package's greedy
    NMS compute (the same-label IoUs); the kept counts; the same-class pairs above IoU 0.5."""
    from adet_lite import matrix_nms
    from adet_lite.solo import mask_nms
    from adet_lite.solo.nms import same_label_mask_iou
    from d2ext.benchmark import median_seconds, use_threads

    use_threads(args.threads)
    # Masks at stride 4 of the input padded to a multiple of 32 (SOLO's finest mask resolution).
    height, width = (math.ceil(s / 32) * 32 // 4 for s in args.size)
    masks, labels, scores = overlapping_blobs(args.nms_masks, height, width, args.nms_classes, args.nms_objects)
    masks, labels, scores = masks.to(args.device), labels.to(args.device), scores.to(args.device)
    greedy_runs = {
        GREEDY: lambda: mask_nms(masks, labels, scores, iou_threshold=0.5),
        ROWWISE: lambda: rowwise_greedy_mask_nms(masks, labels, scores),
        PAIRWISE: lambda: pairwise_greedy_mask_nms(masks, labels, scores),
    }
    kept = {name: fn() for name, fn in greedy_runs.items()}
    if any(not torch.equal(k, kept[GREEDY]) for k in kept.values()):
        raise RuntimeError(f"the greedy NMS baselines disagree: kept {[len(k) for k in kept.values()]}")
    runs = {**greedy_runs, MATRIX: lambda: matrix_nms(masks, labels, scores),
            "  of which: same-label mask IoUs (Matrix NMS and adet_lite's greedy compute them)":
                lambda: same_label_mask_iou(masks, labels)}
    iterations = {PAIRWISE: min(args.nms_iters, PAIRWISE_MAX_ITERS)}
    seconds = {name: median_seconds(fn, args.device, min(args.warmup, 1) if name == PAIRWISE else args.warmup,
                                    iterations.get(name, args.nms_iters))
               for name, fn in runs.items()}
    kept_counts = {name: len(k) for name, k in kept.items()}
    kept_counts[MATRIX] = int((matrix_nms(masks, labels, scores) >= 0.05).sum())
    overlapping = int((same_label_mask_iou(masks, labels) > 0.5).triu(diagonal=1).sum())
    return (height, width), seconds, kept_counts, overlapping


def main():
    from d2ext.benchmark import (TARGET_SIZE, add_timing_arguments, command_line, format_table, machine_description,
                                 verdict)

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_timing_arguments(parser, device="cpu")
    parser.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS), metavar="NAME",
                        help=f"subset of: {', '.join(MODELS)} (none: the NMS comparison only)")
    parser.add_argument("--candidates", type=int, default=500,
                        help="grid candidates per image for the SOLO models (SCORE_THR set to give exactly these)")
    parser.add_argument("--nms-masks", type=int, default=500)
    parser.add_argument("--nms-classes", type=int, default=4)
    parser.add_argument("--nms-objects", type=int, default=40, help="objects the NMS masks are copies of")
    parser.add_argument("--nms-iters", type=int, default=10)
    args = parser.parse_args()

    results = {}
    for name in args.models:
        with ProcessPoolExecutor(max_workers=1, mp_context=mp.get_context("spawn")) as pool:
            results[name] = pool.submit(measure_model, name, args).result()
        r = results[name]
        print(f"{name}: {r['seconds']:.3f} s, peak {r['peak_mb']:.0f} MB ({r['before_mb']:.0f} before inference), "
              f"{r['masks_formed']} masks formed, {r['detections']} detections, {r['gflops']:.1f} GFLOP",
              file=sys.stderr, flush=True)
    with ProcessPoolExecutor(max_workers=1, mp_context=mp.get_context("spawn")) as pool:
        mask_size, nms_seconds, nms_kept, overlapping = pool.submit(measure_nms, args).result()

    conclusive = tuple(args.size) == TARGET_SIZE
    memory = "max allocated" if args.device.startswith("cuda") else "RSS"
    print(f"command: {command_line()}")
    print(f"machine: {machine_description(args.device, args.threads)}")
    print(f"input: one image tensor of {args.size[0]}x{args.size[1]}, batch 1, median of {args.iters} after "
          f"{args.warmup} warm-up; random weights; peak memory = peak {memory} over all inference passes, each "
          f"model in its own process")
    if results:
        print("\n### End to end vs Detectron2's Mask R-CNN R50-FPN\n")
        rows = [{"name": n, "mode": "inference", "seconds": r["seconds"], "memory_mb": r["peak_mb"],
                 "gflops": r["gflops"]} for n, r in results.items()]
        print(format_table(rows, BASELINE))

    if SOLO in results:
        base = results[SOLO]
        print(f"\n### SOLO variants vs {SOLO}\n")
        print("| model | SCORE_THR used | candidates | masks formed | detections | median s | x SOLO | peak MB | "
              "x SOLO | before inference MB | inference MB (peak - before) | x SOLO | forward only MB | x SOLO | "
              "mask-branch outputs MB |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        for name, r in results.items():
            if MODELS[name][1] != "SOLO":
                continue
            extra, base_extra = r["peak_mb"] - r["before_mb"], base["peak_mb"] - base["before_mb"]
            print(f"| {name} | {r['score_threshold']:.5f} | {r['candidates']} | {r['masks_formed']} | "
                  f"{r['detections']} | {r['seconds']:.3f} | {r['seconds'] / base['seconds']:.2f} | "
                  f"{r['peak_mb']:.0f} | {r['peak_mb'] / base['peak_mb']:.2f} | {r['before_mb']:.0f} | "
                  f"{extra:.0f} | {extra / base_extra:.2f} | {r['forward_mb']:.0f} | "
                  f"{r['forward_mb'] / base['forward_mb']:.2f} | {r['mask_output_mb']:.0f} |")
        print("\n(inference MB: what full inference passes need above the loaded model and runtime; forward only:"
              " the same for one backbone + branches pass without post-processing (no candidate masks, no"
              " full-size masks): the first pass of the process; mask-branch outputs: the mask branch's output tensors"
              " (SOLO: S^2 logits per level; Decoupled: S X and S Y logits per level))")
    if SOLOV2 in results:
        r = results[SOLOV2]
        print(f"\n{SOLOV2}: SCORE_THR used {r['score_threshold']:.5f}, {r['candidates']} candidates, "
              f"{r['masks_formed']} masks formed, {r['detections']} detections, mask features + kernels "
              f"{r['mask_output_mb']:.0f} MB; "
              f"{BASELINE}: {results[BASELINE]['detections'] if BASELINE in results else '-'} detections")

    print(f"\n### Matrix NMS vs greedy mask NMS: {args.nms_masks} masks of {mask_size[0]}x{mask_size[1]} "
          f"(stride 4 of the padded input), {args.nms_classes} classes, copies of {args.nms_objects} ellipses "
          f"({overlapping} same-class pairs with IoU > 0.5), {args.device}, median of {args.nms_iters} "
          f"({PAIRWISE}: of {min(args.nms_iters, PAIRWISE_MAX_ITERS)})\n")
    print("| method | median ms | x Matrix NMS | kept |")
    print("| --- | --- | --- | --- |")
    for name, seconds in nms_seconds.items():
        kept = nms_kept.get(name, "-")
        if name == MATRIX:
            kept = f"{kept} (score >= 0.05 after decay)"
        print(f"| {name} | {1000 * seconds:.2f} | {seconds / nms_seconds[MATRIX]:.2f} | {kept} |")

    print("\n### Targets\n")
    if SOLO in results and DECOUPLED in results:
        s, d = results[SOLO], results[DECOUPLED]
        total = d["peak_mb"] / s["peak_mb"]
        extra = (d["peak_mb"] - d["before_mb"]) / (s["peak_mb"] - s["before_mb"])
        forward = d["forward_mb"] / s["forward_mb"]
        print(f"- Decoupled SOLO / SOLO inference peak memory <= {DECOUPLED_MEMORY_TARGET}: inference passes "
              f"(peak - memory before inference) {extra:.2f} ({verdict(extra, DECOUPLED_MEMORY_TARGET, True, conclusive)}); "
              f"whole-process peak {total:.2f}; forward pass only (no post-processing) {forward:.2f}; "
              f"latency x{d['seconds'] / s['seconds']:.2f}")
    nms_conclusive = conclusive and args.nms_masks == 500
    nms_why_not = "not 500 masks" if conclusive else f"not {TARGET_SIZE[0]}x{TARGET_SIZE[1]}"
    speedup = {name: nms_seconds[name] / nms_seconds[MATRIX] for name in (PAIRWISE, ROWWISE, GREEDY)}
    outcome = {name: verdict(speedup[name], MATRIX_NMS_TARGET, False, nms_conclusive, nms_why_not)
               for name in (PAIRWISE, ROWWISE)}
    print(f"- Matrix NMS >= {MATRIX_NMS_TARGET:.0f}x faster than greedy mask NMS at 500 masks (the SOLOv2 paper's "
          f"comparison is with the references' greedy NMS): vs {PAIRWISE}: {speedup[PAIRWISE]:.1f}x "
          f"({outcome[PAIRWISE]}); vs {ROWWISE}: {speedup[ROWWISE]:.1f}x ({outcome[ROWWISE]}); "
          f"vs {GREEDY}: {speedup[GREEDY]:.2f}x (it computes the same IoU matrix, then a loop over "
          f"{args.nms_masks} booleans)")
    if SOLOV2 in results and BASELINE in results:
        v2, base = results[SOLOV2], results[BASELINE]
        print(f"- SOLOv2 / Mask R-CNN end-to-end inference time: {v2['seconds'] / base['seconds']:.2f}, "
              f"arithmetic (GFLOP) {v2['gflops'] / base['gflops']:.2f} (reported, no target)")
    if not args.device.startswith("cuda"):
        print("- CPU run: latencies and the NMS ratio say nothing about a GPU (the references' numbers are GPU).")


if __name__ == "__main__":
    main()
