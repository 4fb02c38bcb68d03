import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: one thread per process is fastest, and keeps a shared 2-core machine usable (two threads under
    load are up to 20x slower). A module asks for it with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
