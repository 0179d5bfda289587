"""A real engine over a tiny random-weight model, for program/DSL/search tests."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    from dendrite.tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("program-model") / "llama", "llama")


@pytest.fixture(scope="session")
def make_engine(tiny_model_dir):
    """Fresh engines (no shared prefix cache) for step counts and determinism."""
    from dendrite.engine import Engine

    made = []

    def make(**kw):
        kw.setdefault("device", "cpu")
        kw.setdefault("num_pages", 1024)
        e = Engine(tiny_model_dir, **kw)
        made.append(e)
        return e

    yield make
    for e in made:
        e.close()


@pytest.fixture(scope="session")
def engine(make_engine):
    """One engine shared by tests that only check semantics."""
    return make_engine()


@pytest.fixture(scope="session")
def dsl():
    import dendrite.dsl

    return dendrite.dsl
