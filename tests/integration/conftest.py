"""Integration tests: training, launchers and end-to-end runs."""
from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")  # module scope: before module fixtures that train
def one_thread():
    """Tiny models gain nothing from 2 threads, and on a shared 2-core machine OpenMP
    barriers make a busy neighbour cost 10-50x."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
