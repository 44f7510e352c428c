import pytest
import torch


@pytest.fixture(autouse=True)
def one_torch_thread():
    """These tests multiply tiny matrices: on a shared 2-core machine, torch's intra-op threads only spin-wait
    (seconds instead of milliseconds). One thread per test, restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
