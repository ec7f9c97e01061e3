"""Benchmark helpers shared by every benchmark script: timing, peak memory, machine description, the
ratio table against a Detectron2 baseline measured in the same run, and the learning-benchmark driver."""
import argparse
import copy
import multiprocessing
import os
import platform
import resource
import statistics
import sys
import tempfile
import time

import torch
from detectron2 import model_zoo
from detectron2.data import DatasetCatalog, DatasetMapper
from detectron2.data import transforms as T
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

BASELINE_CONFIG = "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml"


def machine_description(device, threads=0):
    """``threads``: the torch thread count the measurements used (0: torch's default here)."""
    threads = threads or torch.get_num_threads()
    parts = [platform.node() or "unknown-host", platform.machine(), f"{os.cpu_count()} CPUs",
             f"torch {torch.__version__} ({threads} threads)"]
    if device.startswith("cuda"):
        parts.append(torch.cuda.get_device_name(device))
    return ", ".join(parts)


def baseline_cfg():
    """Detectron2's own Mask R-CNN R50-FPN 1x from its model zoo (random init)."""
    return model_zoo.get_config(BASELINE_CONFIG)


def synthetic_batch(cfg, batch_size, height, width, dataset="synthetic_shapes_val"):
    """Mapped training inputs of exactly ``height`` x ``width``: built-in images stretched to that size with
    their annotations, and ``height`` / ``width`` set to it (post-processing at the input size).

    The built-in images are nearly square: Detectron2's test-time resize to (800, 1333) would give about
    800 x 816, not the COCO-like 800 x 1333 landscape input that the benchmarks' targets are about.
    """
    mapper_args = DatasetMapper.from_config(cfg, is_train=True)
    mapper_args["augmentations"] = [T.Resize((height, width))]  # deterministic: no flip
    mapper = DatasetMapper(**mapper_args)
    dicts = DatasetCatalog.get(dataset)
    batch = [mapper(copy.deepcopy(dicts[i % len(dicts)])) for i in range(batch_size)]
    for inputs in batch:
        inputs["height"], inputs["width"] = height, width
    return batch


def _sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def median_seconds(fn, device, warmup, iters):
    """Median seconds of ``fn`` over ``iters`` timed calls after ``warmup`` untimed ones."""
    return statistics.median(interleaved_seconds([fn], device, warmup, iters)[0])


def _proc_status_mb(field):
    """A memory line of /proc/self/status (Linux) in MB, or None where there is none."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return None


def reset_peak_memory(device):
    """Restart the peak that ``peak_memory_mb`` reports from the memory in use now: CUDA's allocator
    statistics, or on Linux this process's peak RSS (``/proc/self/clear_refs``). Returns False where the
    CPU peak cannot be reset (it then stays the process's peak)."""
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(device)
        return True
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def current_memory_mb(device):
    """Memory in use now: allocated CUDA memory, or this process's RSS on CPU (NaN off Linux)."""
    if device.startswith("cuda"):
        return torch.cuda.memory_allocated(device) / 2**20
    rss = _proc_status_mb("VmRSS")
    return float("nan") if rss is None else rss


def peak_memory_mb(device):
    """Peak since the last reset: allocated CUDA memory, or this process's peak RSS on CPU.

    On Linux the CPU peak is VmHWM: ``reset_peak_memory`` can reset it, and unlike ``ru_maxrss`` it does
    not start at the RSS of the parent that spawned this process."""
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated(device) / 2**20
    peak = _proc_status_mb("VmHWM")
    if peak is not None:
        return peak
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def model_step(cfg, mode, batch, prepare_model=None):
    """A freshly built model (seed 0) of ``cfg`` and a function running one inference of ``batch`` (without
    its annotations; it returns the model's outputs) or one SGD training step on it (it returns None).
    ``prepare_model(model)``, if given, runs once on the built model (e.g. to set weights)."""
    torch.manual_seed(0)
    model = build_model(cfg)
    if prepare_model is not None:
        prepare_model(model)
    if mode == "inference":
        model.eval()
        inputs = [{k: v for k, v in d.items() if k != "instances"} for d in batch]

        def step():
            with torch.no_grad():
                return model(inputs)
    elif mode == "train":
        model.train()
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-4)

        def step():
            with EventStorage():
                losses = model(batch)
                optimizer.zero_grad()
                sum(losses.values()).backward()
                optimizer.step()
    else:
        raise ValueError(f"mode must be 'inference' or 'train', got {mode!r}")
    return step


def measure(cfg, mode, batch, warmup, iters, prepare_model=None):
    """Median seconds and peak memory of one inference (batch of images) or one training step
    (``prepare_model``: see :func:`model_step`). The peak is that of the warm-up and timed steps, from the memory
    in use once the model is built (:func:`reset_peak_memory`; the process's peak on a CPU where it cannot be reset).

    Returns:
        dict of seconds, memory_mb, detections: the instances per image of the last inference (how much
        post-processing and mask prediction the time includes; random models can give few), and gflops: one
        inference's (:func:`inference_gflops`, counted in one more call after the timed ones); both None in
        training.
    """
    device = cfg.MODEL.DEVICE
    step = model_step(cfg, mode, batch, prepare_model)
    detections = []

    def step_counting_detections():
        outputs = step()
        if mode == "inference":  # counts only: the outputs are not kept into the next step's peak memory
            detections[:] = [len(out["instances"]) for out in outputs]

    # The peak of the timed steps, not of building the model and the batch (on a CPU too, where possible).
    reset_peak_memory(device)
    seconds = median_seconds(step_counting_detections, device, warmup, iters)
    memory_mb = peak_memory_mb(device)  # before the FLOP-counting call, which is not part of the measurement
    inference = mode == "inference"
    return {"seconds": seconds, "memory_mb": memory_mb, "detections": detections if inference else None,
            "gflops": inference_gflops(step) if inference else None}


def _int_mm_flops(a_shape, b_shape, *args, out_shape=None, **kwargs):
    """``FlopCounterMode`` formula of ``torch._int_mm``: (M, K) @ (K, N), 2 per multiply-add, as for ``mm``."""
    return 2 * a_shape[0] * a_shape[1] * b_shape[1]


def inference_gflops(fn):
    """GFLOPs of one call of ``fn``: its convolutions and matrix products as torch's ``FlopCounterMode`` counts
    them (2 per multiply-add). RoIAlign, interpolation, NMS and element-wise operations are not counted; they
    are a small part of these models' arithmetic. Where a model's time is bound by arithmetic (a CPU), the
    ratio of two models' counts is about the ratio their times can reach."""
    from torch.utils.flop_counter import FlopCounterMode

    # torch counts no int8 products; Matrix NMS takes its mask IoU product in int8 on a CPU.
    counter = FlopCounterMode(display=False, custom_mapping={torch.ops.aten._int_mm: _int_mm_flops})
    with counter:
        fn()
    return counter.get_total_flops() / 1e9


def interleaved_seconds(steps, device, warmup, iters):
    """Seconds of each of ``steps`` (functions) over ``iters`` rounds that run them one after the other
    (A B A B ...), after ``warmup`` such rounds: a slow drift of the machine (other load, clocks) falls on
    every step alike, and the per-round ratios of two steps compare them under the same conditions.

    Returns:
        one list of ``iters`` seconds per step.
    """
    for _ in range(warmup):
        for step in steps:
            step()
    times = [[] for _ in steps]
    for _ in range(iters):
        for step, step_times in zip(steps, times):
            _sync(device)
            start = time.perf_counter()
            step()
            _sync(device)
            step_times.append(time.perf_counter() - start)
    return times


def per_round_ratios(times):
    """:func:`interleaved_seconds`'s result -> for each step after the first, its time in each round divided
    by the first step's time in the same round (both measured under that round's conditions)."""
    return [[t / b for t, b in zip(step_times, times[0])] for step_times in times[1:]]


def format_table(rows, baseline_name):
    """rows: dicts with name, mode, seconds, memory_mb and optionally detections (a list per image) and gflops
    (columns then show them); ratios against the baseline row of each mode."""
    base = {r["mode"]: r for r in rows if r["name"] == baseline_name}
    with_detections = any(r.get("detections") is not None for r in rows)
    with_gflops = any(r.get("gflops") is not None for r in rows)
    header = ("| model | mode | median s | x baseline | peak MB | x baseline |"
              + (" GFLOP | x baseline |" if with_gflops else "") + (" detections |" if with_detections else ""))
    lines = [header, "|" + " --- |" * header.count(" |")]
    for r in rows:
        b = base.get(r["mode"])
        line = f"| {r['name']} | {r['mode']} | {r['seconds']:.3f} | {_ratio(r, b, 'seconds')} | {r['memory_mb']:.0f} | " \
               f"{_ratio(r, b, 'memory_mb')} |"
        if with_gflops:
            gflops = r.get("gflops")
            line += f" {gflops:.1f} | {_ratio(r, b, 'gflops')} |" if gflops is not None else " - | - |"
        if with_detections:
            detections = r.get("detections")
            line += f" {' + '.join(map(str, detections)) if detections is not None else '-'} |"
        lines.append(line)
    return "\n".join(lines)


def _ratio(row, baseline_row, key):
    if baseline_row is None or row.get(key) is None or baseline_row.get(key) is None:
        return "-"
    return f"{row[key] / baseline_row[key]:.2f}"


# The input size at which the issues state their speed and memory targets (Detectron2's COCO test size).
TARGET_SIZE = (800, 1333)


def verdict(value, target, at_most=True, conclusive=True, why_not=f"not {TARGET_SIZE[0]}x{TARGET_SIZE[1]}"):
    """``value`` against a target (``value <= target`` where ``at_most``, else ``>=``): "met" / "NOT met", or,
    where this run cannot decide (``conclusive`` False: another input size, a smaller problem), whether it
    meets the bar here and ``why_not`` it is not conclusive."""
    met = value <= target if at_most else value >= target
    if not conclusive:
        return f"{'meets' if met else 'misses'} the bar here; not conclusive: {why_not}"
    return "met" if met else "NOT met"


def add_timing_arguments(parser, *, size=TARGET_SIZE, warmup=2, iters=5, device=None,
                         size_help="exact input size (built-in images stretched to it)"):
    """The options of every speed benchmark: --size, --warmup, --iters, --device (default: ``device``, or CUDA
    where available) and --threads (:func:`use_threads`)."""
    parser.add_argument("--size", nargs=2, type=int, default=list(size), metavar=("HEIGHT", "WIDTH"), help=size_help)
    parser.add_argument("--warmup", type=int, default=warmup, help="untimed runs before the timed ones")
    parser.add_argument("--iters", type=int, default=iters, help="timed runs (their median is reported)")
    parser.add_argument("--device", default=device or ("cuda" if torch.cuda.is_available() else "cpu"),
                        help="cpu or cuda[:N]")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")


def use_threads(threads):
    """Set this process's torch threads (--threads); 0 leaves torch's default."""
    if threads:
        torch.set_num_threads(threads)


def command_line():
    return " ".join([os.path.relpath(sys.argv[0])] + sys.argv[1:])


def train_and_evaluate(config_file, max_iter, eval_dataset, output_dir, device, seed=None):
    """Train one config from scratch with Detectron2's trainer, then evaluate it with COCO AP.

    Args:
        max_iter: iteration budget; 0 keeps the config's schedule, otherwise the LR steps move to the same
            fractions of the budget.
        seed: ``SEED`` of the run (None: the config's).
    Returns:
        (iterations, box AP, mask AP, training seconds); an AP is NaN when COCOEvaluator did not report
        its task (``segm`` needs some detections).
    """
    from .engine import Trainer, setup_cfg

    opts = ["OUTPUT_DIR", output_dir, "MODEL.DEVICE", device, "DATASETS.TEST", (eval_dataset,)]
    if seed is not None:
        opts += ["SEED", seed]
    if max_iter:
        cfg = setup_cfg(config_file, opts, freeze=False)
        fractions = [step / cfg.SOLVER.MAX_ITER for step in cfg.SOLVER.STEPS]
        steps = tuple(sorted({int(f * max_iter) for f in fractions} - {0}))
        opts += ["SOLVER.MAX_ITER", max_iter, "SOLVER.STEPS", steps,
                 "SOLVER.WARMUP_ITERS", min(cfg.SOLVER.WARMUP_ITERS, max_iter), "SOLVER.CHECKPOINT_PERIOD", max_iter]
    cfg = setup_cfg(config_file, opts)
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    start = time.perf_counter()
    trainer.train()
    train_seconds = time.perf_counter() - start
    results = Trainer.test(cfg, trainer.model)
    ap = {task: results.get(task, {}).get("AP", float("nan")) for task in ("bbox", "segm")}
    return cfg.SOLVER.MAX_ITER, ap["bbox"], ap["segm"], train_seconds


def _train_and_evaluate_job(job):
    """``train_and_evaluate`` in a worker process of ``learning_benchmark_main`` with ``threads`` torch threads."""
    config_file, max_iter, eval_dataset, output_dir, device, threads, seed = job
    if threads:
        torch.set_num_threads(threads)
    return train_and_evaluate(config_file, max_iter, eval_dataset, output_dir, device, seed)


def learning_benchmark_main(models, description, argv=None):
    """Command-line driver of a learning benchmark: train and evaluate each model with the same budget
    (``train_and_evaluate``) and print the box / mask AP table with each mask AP against the first
    model's (the baseline).

    Options: ``--max-iter``, ``--eval-dataset``, ``--device``, ``--threads`` (per model), ``--jobs`` (models
    trained at once, each in its own process: on a CPU, ``--jobs 2 --threads 1`` uses 2 cores better than
    one 2-thread run at a time), ``--output-dir`` (keep each model's logs, metrics and weights there;
    default: a temporary folder), ``--models`` (names of ``models`` to run; the baseline always runs) and
    ``--seeds`` (train each model once per seed and report the means: one 700-iteration run of the quick-start
    models can differ from a rerun by several AP points, more than the issues' 5-point bar).

    Args:
        models: list of (name, config file path); the first is the baseline.
        description: the script's one-line description (``--help``).
    """
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--max-iter", type=int, default=0, help="iteration budget (0: the configs' own)")
    parser.add_argument("--eval-dataset", default="synthetic_shapes_val")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads of each model on CPU (0: torch's default)")
    parser.add_argument("--jobs", type=int, default=1, help="models trained at the same time (processes)")
    parser.add_argument("--output-dir", default="", help="keep each model's output in OUTPUT_DIR/<index>")
    parser.add_argument("--models", nargs="+", default=None, metavar="NAME",
                        help=f"models to run besides the baseline, from: {[name for name, _ in models[1:]]}")
    parser.add_argument("--seeds", nargs="+", type=int, default=None, metavar="SEED",
                        help="train every model once per seed (SEED) and report mean APs (default: one run, "
                             "each config's SEED)")
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error(f"--jobs must be >= 1, got {args.jobs}")
    if args.seeds is not None and len(set(args.seeds)) != len(args.seeds):
        parser.error(f"--seeds must be distinct, got {args.seeds}")
    if args.models is not None:
        unknown = sorted(set(args.models) - {name for name, _ in models})
        if unknown:
            parser.error(f"unknown --models {unknown}; choose from {[name for name, _ in models[1:]]}")
        models = [models[0]] + [m for m in models[1:] if m[0] in args.models]

    seeds = args.seeds or [None]
    with tempfile.TemporaryDirectory() as tmp:
        root = args.output_dir or tmp
        jobs = [(config_file, args.max_iter, args.eval_dataset,
                 os.path.join(root, str(i) if seed is None else f"{i}_seed{seed}"), args.device, args.threads, seed)
                for i, (_, config_file) in enumerate(models) for seed in seeds]
        if args.jobs == 1:
            results = [_train_and_evaluate_job(job) for job in jobs]
        else:
            # "spawn": a fresh interpreter per worker (forking a process with torch threads can deadlock).
            with multiprocessing.get_context("spawn").Pool(args.jobs) as pool:
                results = pool.map(_train_and_evaluate_job, jobs, chunksize=1)
    rows = []
    for i, (name, _) in enumerate(models):
        runs = results[i * len(seeds):(i + 1) * len(seeds)]  # (iterations, box AP, mask AP, seconds) per seed
        rows.append((name, runs[0][0], *(statistics.mean(run[k] for run in runs) for k in (1, 2, 3)),
                     [run[2] for run in runs]))
    baseline_mask_ap = rows[0][3]
    per_seed = args.seeds is not None
    mean = "mean " if per_seed else ""
    seed_column = f" mask AP, seeds {' / '.join(map(str, seeds))} |" if per_seed else ""
    print(f"| model | iterations | {mean}box AP | {mean}mask AP | {mean}mask AP - baseline | train s |{seed_column}")
    print("| --- " * (7 if per_seed else 6) + "|")
    for name, iters, box_ap, mask_ap, seconds, seed_mask_aps in rows:
        seed_cell = f" {' / '.join(f'{ap:.1f}' for ap in seed_mask_aps)} |" if per_seed else ""
        print(f"| {name} | {iters} | {box_ap:.1f} | {mask_ap:.1f} | {mask_ap - baseline_mask_ap:+.1f} | "
              f"{seconds:.0f} |{seed_cell}")
    print(f"\ncommand: {command_line()}")
    print(f"machine: {machine_description(args.device, args.threads)}; {args.jobs} model(s) trained at a time")
    return rows
