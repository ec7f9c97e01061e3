"""d2ext.benchmark's CPU memory readings: the peak can be reset to the memory in use (Linux)."""
import sys

import pytest
import torch

from d2ext.benchmark import current_memory_mb, peak_memory_mb, reset_peak_memory


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self")
def test_cpu_peak_memory_resets_to_the_memory_in_use():
    big = torch.ones(50 * 2**20)  # 200 MB, written
    peak_with_big = peak_memory_mb("cpu")
    assert peak_with_big >= current_memory_mb("cpu") >= 200
    del big
    assert reset_peak_memory("cpu")
    assert peak_memory_mb("cpu") < peak_with_big - 150
    small = torch.ones(10 * 2**20)  # 40 MB
    assert peak_memory_mb("cpu") >= current_memory_mb("cpu") - 1
    del small
