"""d2ext.engine.launch picks Detectron2's NCCL launch or gloo CPU processes by the model's device."""
import importlib

import pytest

launch_module = importlib.import_module("d2ext.engine.launch")  # the module: the package exports the function


@pytest.fixture
def launched(monkeypatch):
    """Which way each launch went, on a machine that reports CUDA; nothing is started."""
    ways = []
    monkeypatch.setattr(launch_module.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(launch_module, "d2_launch", lambda *args, **kwargs: ways.append("detectron2 (NCCL)"))
    monkeypatch.setattr(launch_module.mp, "spawn", lambda *args, **kwargs: ways.append("gloo"))
    return ways


@pytest.mark.parametrize("device, way", [("cpu", "gloo"), ("cuda", "detectron2 (NCCL)"),
                                         ("cuda:0", "detectron2 (NCCL)"), (None, "detectron2 (NCCL)")])
def test_the_model_device_decides_the_backend(launched, device, way):
    launch_module.launch(print, 2, device=device)
    assert launched == [way]


def test_one_process_runs_in_place(launched):
    launch_module.launch(print, 1, device="cpu")
    assert launched == ["detectron2 (NCCL)"]  # Detectron2's launch calls main_func directly for one process
