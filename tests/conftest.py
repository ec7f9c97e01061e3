import pytest
import torch

import d2ext  # noqa: F401  (registers the built-in datasets)


@pytest.fixture(autouse=True)
def single_thread():
    """Run the tests' tiny models on one thread: their convolutions are too small to gain from a second
    one, and on a 2-core machine that also runs the entry-point tests' subprocesses (or other jobs),
    torch's one thread per core oversubscribes the CPU and makes them several times slower."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
