import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny matrices: threading only adds overhead on the shared 2-core CI machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
