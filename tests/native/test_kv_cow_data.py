"""Copy-on-write against a simulated device KV: parents' slots and data never change.

The device KV is a numpy array indexed by slot. Each step executes the copy
instructions, then writes the new tokens' values at slot_mapping; every
sequence must then read back exactly its own values through export_csr pages.
"""

import numpy as np

from dendrite.kv import BlockPool, KVTree, check_invariants
from kv_sim import DeviceKV, kv_values


def step(tree, dev, node, tokens):
    res = tree.append(node, np.asarray(tokens, dtype=np.int32))
    dev.run_copies(res.copies)
    dev.write(tree, node, res.slot_mapping)
    return res


def read_back_via_csr(tree, dev, nodes):
    indptr, indices, last = tree.export_csr(np.asarray(nodes, dtype=np.int64))
    for i, node in enumerate(nodes):
        pages = indices[indptr[i]:indptr[i + 1]]
        n = (len(pages) - 1) * dev.ps + last[i] if len(pages) else 0
        assert n == tree.num_tokens(node)
        np.testing.assert_array_equal(dev.read(pages, n), kv_values(tree.tokens(node)))


def test_parent_unchanged_after_child_forks_and_writes():
    pool = BlockPool(64, page_size=4)
    tree = KVTree(pool)
    dev = DeviceKV(pool)
    parent = tree.new_sequence()
    step(tree, dev, parent, np.arange(10, 17))  # 7 tokens: last page half full
    parent_pages = tree.pages(parent).copy()
    parent_slots = (parent_pages[np.arange(7) // 4] * 4 + np.arange(7) % 4)
    parent_data = dev.kv[parent_slots].copy()

    kids = tree.fork(parent, 3)
    written = set()
    for i, k in enumerate(kids):
        res = step(tree, dev, k, [100 + i, 200 + i])
        written |= set(res.slot_mapping.tolist())
        written |= {int(d) * 4 + o for _, d, n in res.copies for o in range(n)}
    grand = tree.fork(kids[0], 2)
    for i, g in enumerate(grand):
        res = step(tree, dev, g, np.arange(5) + 300 + i)
        written |= set(res.slot_mapping.tolist())

    assert not written & set(parent_slots.tolist()), "a child wrote into a parent slot"
    np.testing.assert_array_equal(tree.pages(parent), parent_pages)
    np.testing.assert_array_equal(dev.kv[parent_slots], parent_data)
    read_back_via_csr(tree, dev, [parent, *kids, *grand])
    check_invariants(pool)


def test_many_branches_random_writes():
    rng = np.random.default_rng(0)
    pool = BlockPool(2048, page_size=16)
    tree = KVTree(pool)
    dev = DeviceKV(pool)
    root = tree.new_sequence()
    step(tree, dev, root, rng.integers(0, 1000, 37))
    leaves = tree.fork(root, 8)
    for _ in range(30):
        for i, leaf in enumerate(list(leaves)):
            step(tree, dev, leaf, rng.integers(0, 1000, rng.integers(1, 20)))
            if rng.random() < 0.1:  # branch again
                leaves.remove(leaf)
                leaves += tree.fork(leaf, 2)
                tree.release(leaf)  # its children keep it alive
        read_back_via_csr(tree, dev, leaves)
    check_invariants(pool)
    for leaf in leaves:
        tree.release(leaf)
    tree.release(root)
    assert pool.used == 0
