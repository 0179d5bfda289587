"""Speculative-decoding tests share a tiny target model, a second tiny model with
the same tokenizer (other random weights: a draft that is almost never right)
and run torch on one thread; every engine is checked for leaked pages."""

import pytest
import torch

from dendrite.engine import Engine
from dendrite.tiny_model import build_tiny_model


@pytest.fixture(scope="session")
def target_dir(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("spec_target"), "llama", seed=3)


@pytest.fixture(scope="session")
def other_dir(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("spec_other"), "llama", seed=11)


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def make_engine(target_dir):
    """Engines on the tiny target; no page may be left used after close."""
    engines = []

    def make(**kw):
        kw.setdefault("device", "cpu")
        kw.setdefault("num_pages", 512)
        e = Engine(target_dir, **kw)
        engines.append(e)
        return e

    yield make
    for e in engines:
        e.close()
        if e.cache is not None:
            e.cache.clear()
        assert e.pool.used == 0, f"leaked {e.pool.used} KV pages"
        assert e.tree.validate() == []
