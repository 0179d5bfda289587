"""Scheduler: priority + FIFO order, token budget, chunked prefill, preemption order."""

import numpy as np
import pytest

from dendrite.kv import KVTree, Scheduler


def test_priority_then_fifo_and_chunking(tree):
    s = Scheduler(token_budget=10, chunk_size=4)
    s.add(101, priority=0.0, pending_tokens=9)
    s.add(102, priority=1.0, pending_tokens=0)  # decoding: one token
    s.add(103, priority=0.0, pending_tokens=2)
    s.add(104, priority=1.0, pending_tokens=3)
    leaves, counts = s.schedule()
    assert leaves.dtype == np.int64 and counts.dtype == np.int32
    assert leaves.tolist() == [102, 104, 101, 103] and counts.tolist() == [1, 3, 4, 2]
    s.token_budget = 6
    leaves, counts = s.schedule()
    assert leaves.tolist() == [102, 104, 101] and counts.tolist() == [1, 3, 2]
    s.advance(leaves, counts)
    assert s.pending(101) == 7 and s.pending(104) == 0
    s.set_priority(101, 5.0)
    assert s.schedule()[0].tolist()[0] == 101
    s.remove(101)
    assert 101 not in s and len(s) == 3
    with pytest.raises(ValueError):
        s.remove(101)


def test_max_batch():
    s = Scheduler(token_budget=100, chunk_size=8, max_batch=2)
    for leaf in range(5):
        s.add(leaf)
    assert s.schedule()[0].tolist() == [0, 1]


def test_schedule_subset_with_engine_pending():
    s = Scheduler(token_budget=5, chunk_size=3)
    for leaf, prio in [(1, 0.0), (2, 2.0), (3, 1.0)]:
        s.add(leaf, prio)
    leaves, counts = s.schedule(np.array([1, 3]), np.array([4, 1]))
    assert leaves.tolist() == [3, 1] and counts.tolist() == [1, 3]
    with pytest.raises(ValueError):
        s.schedule([9], [1])


def test_preempt_order_and_candidates(tree, pool):
    s = Scheduler(token_budget=64, tree=tree)
    leaves = []
    for prio in [1.0, 0.0, 0.0, 2.0]:
        n = tree.new_sequence()
        tree.append(n, np.arange(8))  # two pages each
        leaves.append(n)
        s.add(n, prio)
    order = s.preempt_order(np.array(leaves))
    assert order.tolist() == [2, 1, 0, 3]  # lowest priority, newest first
    assert s.preempt_candidates(3).tolist() == [leaves[2], leaves[1]]
    assert s.preempt_candidates(100).tolist() == [leaves[i] for i in [2, 1, 0, 3]]
    for n in leaves:
        tree.release(n)
