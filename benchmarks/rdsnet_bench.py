#!/usr/bin/env python
"""RDSNet inference cost against Detectron2's RetinaNet (its object stream's baseline), MBRM's extra
time (in RDSNet and as Mask R-CNN's post-processor) and peak memory over N inference images.

    python benchmarks/rdsnet_bench.py                                   # R-50, 800 x 1333, 50 images
    python benchmarks/rdsnet_bench.py --size 256 448 --iters 3 --images 5   # a quick check

Targets (issue 7): RDSNet <= 1.24 x RetinaNet (the paper's 10.9 -> 8.8 FPS), MBRM <= 4 % extra time,
peak memory flat over the images. Every model is R-50-FPN, randomly initialised (no downloads), with
the score threshold at 0 so that all post-processing runs at full load (100 detections per image).
Each model runs in its own process, so that a peak (RSS on CPU, max allocated on CUDA) is its own; the
memory readings start from the memory in use once the model and the images are loaded (on a CPU where the
peak can be reset: Linux).
Latency: median over --iters runs on one image after --warmup; memory: peak after the first and after
the last of --images different images (built-in synthetic shapes resized to --size). MBRM's extra time
and RDSNet / RetinaNet are also measured with each pair's two models in one process, run alternately
(--iters rounds), whose median per-round ratio is steadier than the ratio of two processes' medians.
"""
import argparse
import multiprocessing as mp
import os
import statistics
import sys
from concurrent.futures import ProcessPoolExecutor

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

BASELINE = "detectron2 retinanet_R_50_FPN_1x"
MASK_RCNN = "detectron2 mask_rcnn_R_50_FPN_1x"  # the baseline of MBRM's extra time on Mask R-CNN
RETINANET_CONFIG = "COCO-Detection/retinanet_R_50_FPN_1x.yaml"
MASK_RCNN_CONFIG = "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml"
ALL_DETECTIONS = ["MODEL.RETINANET.SCORE_THRESH_TEST", "0.0", "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0",
                  "TEST.DETECTIONS_PER_IMAGE", "100"]
# The RDSNet configs' ResNets have the official code's stride on the 3x3 conv (torchvision's); the baselines get
# the same backbone, so that the ratios measure the heads (as the paper's RetinaNet vs RDSNet, one backbone).
RDSNET_BACKBONE = ["MODEL.RESNETS.STRIDE_IN_1X1", "False"]
# name -> (config: a model-zoo name or a path under configs/, extra opts)
MODELS = {
    BASELINE: (RETINANET_CONFIG, RDSNET_BACKBONE),
    "rdsnet_R_50_FPN_1x": ("RDSNet/rdsnet_R_50_FPN_1x.yaml", []),
    "rdsnet_R_50_FPN_1x_refine (MBRM)": ("RDSNet/rdsnet_R_50_FPN_1x_refine.yaml", []),
    # All 100 masks upsampled at once, as the official code does (it upsamples 2 channels, we 1).
    "rdsnet_R_50_FPN_1x, one mask chunk": ("RDSNet/rdsnet_R_50_FPN_1x.yaml", ["MODEL.RDSNET.MASK_CHUNK_SIZE", "100"]),
    MASK_RCNN: (MASK_RCNN_CONFIG, RDSNET_BACKBONE),
    "mask_rcnn_R_50_FPN_1x + MBRM": (MASK_RCNN_CONFIG, [*RDSNET_BACKBONE, "MODEL.META_ARCHITECTURE",
                                                         "GeneralizedRCNNWithMBRM", "MODEL.MBRM.ENABLED", "True"]),
}
# Detectron2's own models, the baselines of the ratios (their memory is reported, not judged).
DETECTRON2_BASELINES = (BASELINE, MASK_RCNN)
# (label, first model, second model, as a percentage, target): timed alternately in one process as well; the
# label's quantity is the second model's time over the first's (as a percentage: the extra time); the issue's
# target for that ratio (at most; None: reported only), judged on the paired measure.
PAIRS = [("RDSNet / RetinaNet time", BASELINE, "rdsnet_R_50_FPN_1x", False, 1.24),
         ("MBRM extra time", "rdsnet_R_50_FPN_1x", "rdsnet_R_50_FPN_1x_refine (MBRM)", True, 1.04),
         ("MBRM extra time", MASK_RCNN, "mask_rcnn_R_50_FPN_1x + MBRM", True, None)]


FLAT_MEMORY_TOLERANCE_MB = 1.0  # the readings' resolution: VmHWM is in kB, CUDA's allocator rounds blocks


def _format_ratio(ratio, as_percentage):
    return f"{100 * (ratio - 1):+.1f} %" if as_percentage else f"{ratio:.2f}x"


def _config_file(config):
    from detectron2 import model_zoo

    if config in (RETINANET_CONFIG, MASK_RCNN_CONFIG):
        return model_zoo.get_config_file(config)
    return os.path.join(REPO, "configs", config)


def _model_and_images(name, args, num_images):
    """One of ``MODELS`` (random weights, seed 0, eval mode) and ``num_images`` inference inputs for it."""
    import d2ext  # noqa: F401  (datasets; registers every meta-architecture through get_cfg)
    from d2ext import benchmark
    from d2ext.engine import setup_cfg
    from detectron2.modeling import build_model

    config, opts = MODELS[name]
    cfg = setup_cfg(_config_file(config), ["MODEL.WEIGHTS", "", "MODEL.DEVICE", args.device,
                                           *ALL_DETECTIONS, *opts])
    images = [{k: v for k, v in d.items() if k != "instances"}
              for d in benchmark.synthetic_batch(cfg, num_images, args.size[0], args.size[1])]
    torch.manual_seed(0)
    return build_model(cfg).eval(), images


def measure_model(name, args):
    """In a fresh process: (median seconds per image, [peak MB after each of the --images images], GFLOP of
    one inference: its convolutions and matrix products, ``d2ext.benchmark.inference_gflops``)."""
    from d2ext import benchmark

    benchmark.use_threads(args.threads)
    model, images = _model_and_images(name, args, args.images)
    with torch.no_grad():
        seconds = benchmark.median_seconds(lambda: model(images[:1]), args.device, args.warmup, args.iters)
        # The readings start from the memory in use (the model and the images), on a CPU too where possible.
        benchmark.reset_peak_memory(args.device)
        peaks = []
        for image in images:
            model([image])
            peaks.append(benchmark.peak_memory_mb(args.device))
        # Counted after the memory readings: the counting call holds extra tensors.
        gflops = benchmark.inference_gflops(lambda: model(images[:1]))
    return seconds, peaks, gflops


def measure_pair_alternately(first, second, args):
    """In a fresh process: the per-round ratios (second / first model's seconds) of the two models of a pair
    run alternately on one image (``interleaved_seconds``), so that the machine's drift falls on both."""
    from d2ext import benchmark

    benchmark.use_threads(args.threads)
    steps = []
    for name in (first, second):
        model, image = _model_and_images(name, args, 1)
        steps.append(lambda model=model, image=image: model(image))
    with torch.no_grad():
        times = benchmark.interleaved_seconds(steps, args.device, args.warmup, args.iters)
    return benchmark.per_round_ratios(times)[0]


def main():
    from d2ext.benchmark import (TARGET_SIZE, add_timing_arguments, command_line, format_table, machine_description,
                                 verdict)

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_timing_arguments(parser)
    parser.add_argument("--images", type=int, default=50, help="inference images for the memory rows")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS), metavar="NAME",
                        help=f"subset of: {', '.join(MODELS)} (the baseline always runs)")
    args = parser.parse_args()

    names = [BASELINE] + [n for n in args.models if n != BASELINE]
    results = {}
    for name in names:
        with ProcessPoolExecutor(max_workers=1, mp_context=mp.get_context("spawn")) as pool:
            results[name] = pool.submit(measure_model, name, args).result()
        seconds, peaks, gflops = results[name]
        print(f"{name}: {seconds:.3f} s, peak {peaks[0]:.0f} -> {peaks[-1]:.0f} MB, {gflops:.1f} GFLOP", file=sys.stderr,
              flush=True)

    print(f"command: {command_line()}")
    print(f"machine: {machine_description(args.device, args.threads)}")
    print(f"input: {args.size[0]}x{args.size[1]} (height x width, exact), batch 1, median of {args.iters} after "
          f"{args.warmup} warm-up; memory over {args.images} images; score threshold 0, 100 detections")
    rows = [{"name": n, "mode": "inference", "seconds": s, "memory_mb": p[-1], "gflops": g}
            for n, (s, p, g) in results.items()]
    print(format_table(rows, BASELINE))
    print()
    # The target is this package's models' memory; Detectron2's baselines are listed in the table, not judged.
    growths = {name: peaks[-1] - peaks[len(peaks) // 2] for name, (_, peaks, _) in results.items()
               if name not in DETECTRON2_BASELINES}
    if growths:
        worst = max(growths, key=growths.get)
        flat = verdict(growths[worst], FLAT_MEMORY_TOLERANCE_MB, conclusive=args.images >= 10,
                       why_not="fewer than 10 images")
        print(f"Peak memory growth over the second half of the images: at most {growths[worst]:+.0f} MB ({worst}): "
              f"{flat} (target: flat, within {FLAT_MEMORY_TOLERANCE_MB:.0f} MB)")
    else:
        print("Peak memory growth: not judged (only Detectron2's baselines were run)")
    # The middle image separates a one-off rise (allocator high-water mark) from growth per image.
    middle = args.images // 2
    print(f"| model | peak MB after image 1 | after image {middle + 1} | after image N | growth MB, 1 -> N | "
          f"growth MB, {middle + 1} -> N |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, (_, peaks, _) in results.items():
        print(f"| {name} | {peaks[0]:.0f} | {peaks[middle]:.0f} | {peaks[-1]:.0f} | {peaks[-1] - peaks[0]:+.0f} | "
              f"{peaks[-1] - peaks[middle]:+.0f} |")
    print()
    for label, first, second, as_percentage, target in PAIRS:
        if first in results and second in results:
            separate = results[second][0] / results[first][0]
            with ProcessPoolExecutor(max_workers=1, mp_context=mp.get_context("spawn")) as pool:
                ratios = pool.submit(measure_pair_alternately, first, second, args).result()
            paired = statistics.median(ratios)
            outcome = "" if target is None else (
                f": {verdict(paired, target, conclusive=tuple(args.size) == TARGET_SIZE)} (target "
                f"<= {_format_ratio(target, as_percentage)})")
            print(f"{label}, {second} vs {first}: {_format_ratio(separate, as_percentage)} (medians of separate "
                  f"processes); {_format_ratio(paired, as_percentage)} (median of {len(ratios)} per-round ratios, "
                  f"the two run alternately in one process){outcome}")


if __name__ == "__main__":
    main()
