"""Fork cost does not grow with context length (O(1): no per-page work)."""

import numpy as np

from dendrite import _native
from dendrite.kv import BlockPool, KVTree


def context(tree, num_tokens):
    node = tree.new_sequence()
    tree.append(node, np.zeros(num_tokens, dtype=np.int32))
    return node


def test_fork_touches_nothing_at_128k():
    pool = BlockPool(8192 + 64, page_size=16)
    tree = KVTree(pool)
    node = context(tree, 128 * 1024)
    used, rc = pool.used, pool.debug_refcounts()
    kids = tree.fork(node, 1000)
    assert pool.used == used
    np.testing.assert_array_equal(pool.debug_refcounts(), rc)
    for k in kids:
        tree.release(k)


def test_fork_time_flat_from_1k_to_128k():
    pool = BlockPool(8192 + 64 + 64, page_size=16)
    tree = KVTree(pool)
    small, big = context(tree, 1024), context(tree, 128 * 1024)
    # Interleave and take the best of several medians to resist CI noise;
    # a per-page cost would make the 128K figure ~128x the 1K one.
    t_small = min(_native.bench_fork_ns(tree, small, 2000, 5) for _ in range(3))
    t_big = min(_native.bench_fork_ns(tree, big, 2000, 5) for _ in range(3))
    assert t_big < 3.0 * t_small + 200.0, (t_small, t_big)
