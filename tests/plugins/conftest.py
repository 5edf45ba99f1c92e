import pytest


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny torch problems: thread start-up costs more than it saves (and CI shares its cores)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
