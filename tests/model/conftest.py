"""Model tests run their tiny matmuls on one thread.

They gain nothing from threads, and on a busy 2-core CI box thread
oversubscription makes them 5-10x slower.
"""

import pytest
import torch


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
