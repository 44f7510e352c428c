import pytest


@pytest.fixture(autouse=True)
def one_torch_thread():
    """The suite multiplies tiny matrices: on a shared 2-core machine extra intra-op threads only spin-wait."""
    torch = pytest.importorskip("torch")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
