import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    # Tiny matrices: threading only adds overhead on the shared 2-core CI machine. Session scope, so
    # that module-scoped fixtures (reference runs computed once per module) run single-threaded too:
    # results compared across processes must not depend on how many threads summed them.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
