"""d2ext.benchmark: the CPU memory readings (the peak can be reset to the memory in use; Linux) and
model_step's hook on the built model."""
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
