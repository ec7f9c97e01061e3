import pytest
import torch


@pytest.fixture
def single_thread():
    """Run a test's tiny models on one thread: on a shared 2-core machine, torch's default of one thread
    per core oversubscribes the CPU and makes these small convolutions several times slower."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
