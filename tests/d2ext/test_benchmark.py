"""d2ext.benchmark: the CPU memory readings (the peak can be reset to the memory in use; Linux) and
model_step's hook on the built model, the FLOP count and the ratio table, and the learning benchmark's
means over seeds."""
import os
import sys

import pytest
import torch

from d2ext.benchmark import current_memory_mb, peak_memory_mb, reset_peak_memory


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self")
def test_cpu_peak_memory_resets_to_the_memory_in_use():
    big = torch.ones(100 * 2**20)  # 400 MB, written
    peak_with_big = peak_memory_mb("cpu")
    assert peak_with_big >= current_memory_mb("cpu") >= 400
    del big
    assert reset_peak_memory("cpu")
    # Without the reset the peak stays at peak_with_big. The margin leaves room for what the rest of the
    # process holds meanwhile (one CI run kept 80 MB more than the 200 MB tensor of an earlier version).
    assert peak_memory_mb("cpu") < peak_with_big - 250
    small = torch.ones(10 * 2**20)  # 40 MB
    assert peak_memory_mb("cpu") >= current_memory_mb("cpu") - 1
    del small


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self")
def test_measure_reports_the_peak_of_the_timed_steps_on_the_cpu():
    from d2ext.benchmark import measure, synthetic_batch
    from d2ext.engine import setup_cfg
    from d2ext.testing import config_path

    cfg = setup_cfg(config_path("quickstart/mask_rcnn_R18_FPN_synthetic.yaml"), [])
    batch = synthetic_batch(cfg, 1, 64, 96, dataset="synthetic_shapes_mini_val")
    big = torch.ones(100 * 2**20)  # 400 MB, written, freed before the measurement
    peak_with_big = peak_memory_mb("cpu")
    del big
    result = measure(cfg, "inference", batch, warmup=0, iters=1)
    assert result["memory_mb"] < peak_with_big - 250  # the tiny model's steps need far less


def test_model_step_prepares_the_built_model_once():
    from d2ext.benchmark import model_step, synthetic_batch
    from d2ext.engine import setup_cfg
    from d2ext.testing import config_path

    cfg = setup_cfg(config_path("quickstart/mask_rcnn_R18_FPN_synthetic.yaml"), [])
    batch = synthetic_batch(cfg, 1, 64, 96, dataset="synthetic_shapes_mini_val")
    prepared = []

    def zero_box_predictor(model):
        prepared.append(model)
        torch.nn.init.zeros_(model.roi_heads.box_predictor.cls_score.weight)

    step = model_step(cfg, "inference", batch, prepare_model=zero_box_predictor)
    step()
    step()
    (model,) = prepared
    assert model.roi_heads.box_predictor.cls_score.weight.abs().sum() == 0


def test_per_round_ratios_divide_each_round_by_the_first_steps_time_in_that_round():
    from d2ext.benchmark import per_round_ratios

    times = [[1.0, 2.0, 4.0], [1.5, 2.0, 2.0], [3.0, 1.0, 8.0]]
    assert per_round_ratios(times) == [[1.5, 1.0, 0.5], [3.0, 0.5, 2.0]]
    assert per_round_ratios([[1.0, 2.0]]) == []


def test_inference_gflops_counts_convolutions_and_matrix_products_only():
    from d2ext.benchmark import inference_gflops

    conv = torch.nn.Conv2d(3, 8, kernel_size=3, padding=1)
    linear = torch.nn.Linear(8 * 10 * 12, 5)
    image = torch.randn(2, 3, 10, 12)

    def forward():
        with torch.no_grad():
            features = torch.relu(conv(image))  # the ReLU and the bias additions are not counted
            return linear(features.flatten(1))

    conv_macs = 0
    for _ in range(2 * 10 * 12):  # every output position of both images
        conv_macs += 8 * 3 * 3 * 3
    linear_macs = 2 * (8 * 10 * 12) * 5
    assert inference_gflops(forward) == pytest.approx(2 * (conv_macs + linear_macs) / 1e9)


def test_inference_gflops_counts_int8_products_like_float_ones():
    from d2ext.benchmark import inference_gflops

    masks = torch.rand(7, 40) > 0.5  # Matrix NMS's IoU product, taken in int8 on a CPU
    flops = inference_gflops(lambda: torch._int_mm(masks.view(torch.int8), masks.view(torch.int8).T)) * 1e9
    multiply_adds = 0
    for _ in range(7 * 7):  # every output entry
        multiply_adds += 40
    assert flops == pytest.approx(2 * multiply_adds)


def test_format_table_shows_gflops_and_their_ratio_to_the_baseline_of_the_same_mode():
    from d2ext.benchmark import format_table

    rows = [{"name": "base", "mode": "inference", "seconds": 2.0, "memory_mb": 100, "gflops": 400.0,
             "detections": [84]},
            {"name": "new", "mode": "inference", "seconds": 1.5, "memory_mb": 50, "gflops": 340.0,
             "detections": [100]},
            {"name": "base", "mode": "train", "seconds": 4.0, "memory_mb": 200, "gflops": None, "detections": None}]
    lines = format_table(rows, "base").splitlines()
    assert lines[0] == ("| model | mode | median s | x baseline | peak MB | x baseline | GFLOP | x baseline | "
                        "detections |")
    assert lines[3] == "| new | inference | 1.500 | 0.75 | 50 | 0.50 | 340.0 | 0.85 | 100 |"
    assert lines[4] == "| base | train | 4.000 | 1.00 | 200 | 1.00 | - | - | - |"
    # Without counts (the scripts that time their own way) the table keeps its columns.
    plain = [{k: v for k, v in row.items() if k not in ("gflops", "detections")} for row in rows]
    assert "GFLOP" not in format_table(plain, "base")


def test_learning_benchmark_averages_each_models_seeds(monkeypatch, capsys):
    from d2ext import benchmark

    # A fake training: APs made from the config and the seed, so each row's mean can be checked by hand.
    fake_ap = {("a.yaml", 1): (50.0, 40.0), ("a.yaml", 2): (54.0, 46.0),
               ("b.yaml", 1): (30.0, 20.0), ("b.yaml", 2): (36.0, 31.0)}
    calls = []

    def fake_train_and_evaluate(config_file, max_iter, eval_dataset, output_dir, device, seed=None):
        calls.append((config_file, seed, os.path.basename(output_dir)))
        box_ap, mask_ap = fake_ap[(config_file, seed)]
        return 700, box_ap, mask_ap, 10.0 * seed

    monkeypatch.setattr(benchmark, "train_and_evaluate", fake_train_and_evaluate)
    rows = benchmark.learning_benchmark_main([("base", "a.yaml"), ("other", "b.yaml")], "test",
                                             ["--seeds", "1", "2", "--output-dir", "/nonexistent"])
    assert calls == [("a.yaml", 1, "0_seed1"), ("a.yaml", 2, "0_seed2"), ("b.yaml", 1, "1_seed1"),
                     ("b.yaml", 2, "1_seed2")]
    assert rows == [("base", 700, 52.0, 43.0, 15.0, [40.0, 46.0]), ("other", 700, 33.0, 25.5, 15.0, [20.0, 31.0])]
    table = capsys.readouterr().out
    assert "| other | 700 | 33.0 | 25.5 | -17.5 | 15 | 20.0 / 31.0 |" in table
    assert "mask AP, seeds 1 / 2" in table

    with pytest.raises(SystemExit):
        benchmark.learning_benchmark_main([("base", "a.yaml")], "test", ["--seeds", "1", "1"])
    assert "--seeds must be distinct" in capsys.readouterr().err
