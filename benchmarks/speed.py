#!/usr/bin/env python
"""Inference and training-step speed and peak memory of any configs, with Detectron2's Mask R-CNN
R50-FPN measured in the same run as the baseline; prints a table with ratios, the command and the machine.

    python benchmarks/speed.py --config-file configs/CondInst/MS_R_50_1x.yaml --size 800 1333
    python benchmarks/speed.py --config-file A.yaml --config-file B.yaml --modes inference --iters 5

Each (model, mode) is measured in its own process so that peak memory (RSS on CPU, max allocated on
CUDA) belongs to that measurement alone. Models are randomly initialised (no downloads). A random model
keeps few detections at its configured score threshold, so the baseline runs with
``MODEL.ROI_HEADS.SCORE_THRESH_TEST 0`` (as in the other benchmarks; its mask head then runs on its
detections) and --opts should lower the compared configs' thresholds likewise; the table shows the
detections per image that each inference time includes, and each inference's GFLOP (convolutions and
matrix products). Inference is also timed with all the models in one process, run alternately (--iters
rounds): the median per-round ratio to the baseline is the steadier comparison where the machine's speed
drifts between processes.
"""
import argparse
import multiprocessing as mp
import os
import queue as queue_module
import statistics
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASELINE = "detectron2 mask_rcnn_R_50_FPN_1x"
# A random Mask R-CNN scores few boxes above the default 0.05; at 0 it sends its detections through the mask head.
BASELINE_OPTS = ["MODEL.ROI_HEADS.SCORE_THRESH_TEST", 0.0]


def _config(config_file, opts, args):
    """The config of one measured model: Detectron2's baseline (``config_file`` None) or ``config_file`` + ``opts``."""
    import d2ext  # noqa: F401  (datasets)
    from d2ext import benchmark
    from d2ext.engine import setup_cfg

    if config_file is None:
        cfg = benchmark.baseline_cfg()
        cfg.merge_from_list(["MODEL.WEIGHTS", "", "MODEL.DEVICE", args.device, *BASELINE_OPTS])
        return cfg
    return setup_cfg(config_file, ["MODEL.WEIGHTS", "", "MODEL.DEVICE", args.device, *opts], freeze=False)


def _measure(config_file, opts, mode, args, prepare_model):
    from d2ext import benchmark

    cfg = _config(config_file, opts, args)
    batch = benchmark.synthetic_batch(cfg, args.batch_size, args.size[0], args.size[1])
    return benchmark.measure(cfg, mode, batch, args.warmup, args.iters, prepare_model)


def _interleaved_ratios(models, args):
    from d2ext import benchmark

    steps = []
    for _, config_file, opts, *prepare_model in models:
        cfg = _config(config_file, opts, args)
        batch = benchmark.synthetic_batch(cfg, args.batch_size, args.size[0], args.size[1])
        steps.append(benchmark.model_step(cfg, "inference", batch, *prepare_model))
    return benchmark.per_round_ratios(benchmark.interleaved_seconds(steps, args.device, args.warmup, args.iters))


def _in_child(target, target_args, threads, queue):
    from d2ext.benchmark import use_threads

    use_threads(threads)
    queue.put(target(*target_args))


def _run_in_spawned_process(target, target_args, args, what):
    """``target(*target_args)`` in a fresh process with ``args.threads`` torch threads."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_in_child, args=(target, target_args, args.threads, queue))
    proc.start()
    # The result is read before the join: a child whose result outgrows the pipe's buffer would otherwise wait
    # for the read while the parent waits for its exit. A child that dies puts nothing: the wait is polled.
    while True:
        exited = not proc.is_alive()  # before the read: a result put just before the exit is still read
        try:
            result = queue.get(timeout=1.0)
            break
        except queue_module.Empty:
            if exited:
                raise RuntimeError(f"measuring {what} failed (exit {proc.exitcode})") from None
    proc.join()
    return result


def measure_isolated(config_file, opts, mode, args, prepare_model=None):
    return _run_in_spawned_process(_measure, (config_file, opts, mode, args, prepare_model), args,
                                   f"{config_file or BASELINE} ({mode})")


def interleaved_inference_ratios(models, args):
    """All ``models`` (as :func:`measure_and_report`'s; the first is the baseline) built in one process and
    run alternately for ``args.iters`` rounds (``d2ext.benchmark.interleaved_seconds``): per model after the
    first, its per-round inference time ratios to the first model's. Steadier than the ratio of two
    processes' medians on a machine whose speed drifts (a lent GPU machine's host CPU, at batch 1)."""
    return _run_in_spawned_process(_interleaved_ratios, (models, args), args, "the models alternately")


def add_measurement_arguments(parser, default_modes):
    """The options every speed benchmark shares: modes, input size, batch, warm-up / iterations, device, threads."""
    from d2ext.benchmark import add_timing_arguments

    parser.add_argument("--modes", nargs="+", default=default_modes, choices=["inference", "train"])
    parser.add_argument("--batch-size", type=int, default=1)
    add_timing_arguments(parser)


def measure_and_report(models, args, baseline_name):
    """Measure every (model, mode) in its own process and print the command, the machine, the input and
    the ratio table against ``baseline_name``.

    Args:
        models: list of (name, config file or None for Detectron2's baseline, extra opts) or of
            (name, config file, extra opts, prepare_model): ``prepare_model(model)`` runs on the built
            model in the measuring process (a module-level function, so that it pickles).
        args: parsed ``add_measurement_arguments`` options.
    Returns:
        the table's rows: dicts with name, mode, seconds, memory_mb, detections (per image) and gflops (one
        inference's convolutions and matrix products; both None in training) and, for inference rows after
        the first model, paired_ratio: the median per-round ratio to the first model with the two run
        alternately in one process (:func:`interleaved_inference_ratios`).
    """
    from d2ext.benchmark import command_line, format_table, machine_description

    rows = []
    for name, config_file, opts, *prepare_model in models:
        for mode in args.modes:
            row = {"name": name, "mode": mode, **measure_isolated(config_file, opts, mode, args, *prepare_model)}
            rows.append(row)
            gflops = "" if row["gflops"] is None else f", {row['gflops']:.1f} GFLOP"
            print(f"{name} {mode}: {row['seconds']:.3f} s, {row['memory_mb']:.0f} MB, detections {row['detections']}"
                  f"{gflops}", file=sys.stderr, flush=True)
    print(f"command: {command_line()}")
    print(f"machine: {machine_description(args.device, args.threads)}")
    print(f"input: {args.size[0]}x{args.size[1]} (height x width, exact), batch {args.batch_size}, "
          f"median of {args.iters} after {args.warmup} warm-up")
    print(format_table(rows, baseline_name))
    if "inference" in args.modes and len(models) > 1:
        print(f"Inference alternating with {baseline_name} in one process, {args.iters} rounds after {args.warmup}:")
        for (name, *_), ratios in zip(models[1:], interleaved_inference_ratios(models, args)):
            median = statistics.median(ratios)
            for row in rows:
                if row["name"] == name and row["mode"] == "inference":
                    row["paired_ratio"] = median
            print(f"- {name}: median per-round ratio {median:.2f} (min {min(ratios):.2f}, max {max(ratios):.2f})")
    return rows


def main():
    parser = argparse.ArgumentParser(description="Speed / memory vs Detectron2's Mask R-CNN R50-FPN.")
    parser.add_argument("--config-file", action="append", default=[], help="repeatable")
    add_measurement_arguments(parser, default_modes=["inference", "train"])
    parser.add_argument("--opts", nargs=argparse.REMAINDER, default=[],
                        help="KEY VALUE for the --config-file models (not the baseline)")
    args = parser.parse_args()
    models = [(BASELINE if f is None else os.path.relpath(f, REPO), f, args.opts) for f in [None] + args.config_file]
    measure_and_report(models, args, BASELINE)


if __name__ == "__main__":
    main()
