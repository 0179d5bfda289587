"""Fixtures of the parallel tests (imported by each; no conftest.py here, so the
`conftest` module name stays the benchmarks' one). They share one tiny model (biased attention: the row-parallel bias
is added once) and run torch on one thread per process."""

import pytest
import torch

from dendrite.tiny_model import build_tiny_model


@pytest.fixture(scope="session")
def tp_model_dir(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("tp_model"), "llama", seed=5,
                            attention_bias=True, shards=2)


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
