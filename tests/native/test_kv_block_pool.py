"""BlockPool: allocation order, refcounts, stats, headroom, OutOfPages semantics,
size checks, the users it tracks and the lifetime its users give it."""

import gc
import weakref

import numpy as np
import pytest

import dendrite
from dendrite.kv import (BlockPool, InvariantError, KVTree, OutOfPages, RadixCache, Scheduler,
                         check_invariants)


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


def test_slot_overflow_names_both_sizes():
    with pytest.raises(ValueError, match=r"BlockPool: num_pages \* page_size = 2 \* 1073741824 "
                                         r"must be < 2\*\*31 \(slot ids are int32\)"):
        BlockPool(2, page_size=2**30)
    assert BlockPool(1, page_size=2**31 - 1).page_size == 2**31 - 1


def test_sizes_accept_numpy_ints_and_name_bad_ones():
    assert BlockPool(np.int64(4), page_size=np.int32(8)).num_pages == 4
    with pytest.raises(TypeError, match=r"^BlockPool: page_size must be an int, got bool True$"):
        BlockPool(4, page_size=True)
    with pytest.raises(TypeError, match=r"^BlockPool: num_pages must be an int, got float 4\.0$"):
        BlockPool(4.0)
    with pytest.raises(ValueError, match=r"^BlockPool: num_pages = 1180591620717411303424 is out"):
        BlockPool(2**70)
    with pytest.raises(TypeError):  # a tree needs a pool; None must not reach the core
        KVTree(None)
    with pytest.raises(TypeError):
        RadixCache(None)


def test_pool_knows_its_live_trees_and_caches():
    pool = BlockPool(16, page_size=4)
    tree, cache = KVTree(pool), RadixCache(pool)
    assert pool.debug_trees() == [tree] and pool.debug_trees()[0] is tree
    assert pool.debug_caches() == [cache]
    tree.append(tree.new_sequence(), np.arange(6))
    check_invariants(pool)  # finds the tree's references without being told
    with pytest.raises(InvariantError, match="refcount 1 but 0 references"):
        check_invariants(pool, trees=[])
    del tree  # the registration is weak: the tree goes, and its pages with it
    gc.collect()
    assert pool.debug_trees() == [] and pool.used == 0
    check_invariants(pool)


def test_tree_held_only_by_a_scheduler_is_still_checked():
    pool = BlockPool(16, page_size=4)
    sched = Scheduler(token_budget=8, tree=KVTree(pool))  # no Python name for the tree
    (tree,) = pool.debug_trees()  # a new wrapper of the same native tree
    root = tree.new_sequence()
    tree.append(root, np.arange(5))
    del tree
    gc.collect()
    assert pool.used == 2 and len(pool.debug_trees()) == 1
    check_invariants(pool)
    del sched
    gc.collect()
    assert pool.debug_trees() == [] and pool.used == 0


def test_a_tree_keeps_its_pool_object_alive():
    tree = KVTree(BlockPool(8, page_size=4))
    pool_ref = weakref.ref(tree.pool)
    gc.collect()
    assert pool_ref() is tree.pool  # the same object, not a new wrapper
    tree.append(tree.new_sequence(), [1, 2, 3])
    assert pool_ref().used == 1
    del tree
    gc.collect()
    assert pool_ref() is None


def test_check_invariants_refuses_a_tree_of_another_pool():
    pool, other = BlockPool(8, page_size=4), BlockPool(8, page_size=4)
    with pytest.raises(InvariantError, match="KVTree #0 uses another pool"):
        check_invariants(pool, trees=[KVTree(other)])
