"""BlockPool: allocation order, refcounts, stats, headroom, OutOfPages semantics."""

import numpy as np
import pytest

import dendrite
from dendrite.kv import BlockPool, OutOfPages, check_invariants


def test_reexports_and_exception_types():
    assert dendrite.OutOfPages is OutOfPages
    assert issubclass(OutOfPages, RuntimeError)
    assert dendrite.BlockPool is BlockPool


def test_allocate_free_stats():
    p = BlockPool(8, page_size=16)
    assert (p.num_pages, p.page_size, p.used, p.free) == (8, 16, 0, 8)
    assert p.allocate() == 0
    batch = p.allocate_batch(3)
    assert batch.dtype == np.int32 and batch.tolist() == [1, 2, 3]
    assert (p.used, p.free, p.high_watermark) == (4, 4, 4)
    p.incref(1)
    assert p.refcount(1) == 2
    assert p.decref(1) is False
    assert p.decref(1) is True
    p.decref_batch(batch[1:])
    assert (p.used, p.high_watermark) == (1, 4)
    assert p.allocate() == 3  # LIFO: most recently freed first
    check_invariants(p, extra_refs=[0, 3])  # held directly, not by a tree


def test_errors_leave_pool_unchanged():
    p = BlockPool(4, page_size=16)
    with pytest.raises(OutOfPages):
        p.allocate_batch(5)
    assert p.used == 0
    p.allocate_batch(4)
    with pytest.raises(OutOfPages):
        p.allocate()
    with pytest.raises(IndexError):
        p.refcount(4)
    q = BlockPool(2)
    with pytest.raises(ValueError):
        q.decref(0)
    with pytest.raises(ValueError):
        BlockPool(4, page_size=0)


def test_cow_headroom_only_for_copies():
    p = BlockPool(4, page_size=16, cow_headroom=2)
    assert p.can_allocate(2) and not p.can_allocate(3)
    p.allocate_batch(2)
    with pytest.raises(OutOfPages):
        p.allocate()
    assert len(p.allocate_batch(2, for_cow=True)) == 2
    assert p.free == 0


def test_slots_fit_int32():
    with pytest.raises(ValueError):
        BlockPool(2**28, page_size=16)
