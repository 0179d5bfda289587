"""Fixtures for the native-core tests: a small pool, a tree and a cache on it."""

from __future__ import annotations

import pytest

from dendrite.kv import BlockPool, KVTree, RadixCache, check_invariants


@pytest.fixture
def pool() -> BlockPool:
    return BlockPool(256, page_size=4)


@pytest.fixture
def tree(pool: BlockPool) -> KVTree:
    t = KVTree(pool)
    yield t
    check_invariants(pool)


@pytest.fixture
def cache(pool: BlockPool) -> RadixCache:
    return RadixCache(pool)
