"""Engine tests share one tiny Llama model dir and run torch on one thread."""

import pytest
import torch

from dendrite.engine import Engine
from dendrite.tiny_model import build_tiny_model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("engine_model"), "llama", seed=3)


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(params=[False, True], ids=["sync", "lookahead"])
def make_engine(tiny_model_dir, request):
    """Engines on the tiny model; each is checked for leaked pages at teardown.

    Every engine test runs twice: stepping synchronously, and launching each
    steady decode step before the previous one's tokens are read (the CUDA
    default), which must not change a single token."""
    engines = []

    def make(**kw):
        kw.setdefault("device", "cpu")
        kw.setdefault("num_pages", 512)
        kw.setdefault("lookahead", request.param)
        e = Engine(tiny_model_dir, **kw)
        engines.append(e)
        return e

    yield make
    for e in engines:
        e.close()
        if e.cache is not None:
            e.cache.clear()
        assert e.pool.used == 0, f"leaked {e.pool.used} KV pages"
