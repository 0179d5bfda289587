"""KVTree: fork, append (slot mapping, copy-on-write), freeze, release, truncate, CSR."""

import math

import numpy as np
import pytest

from dendrite.kv import BlockPool, FrozenNode, KVTree, OutOfPages, RadixCache, check_invariants


def test_append_slot_mapping(tree):
    root = tree.new_sequence()
    res = tree.append(root, [5, 6, 7, 8, 9])
    assert res.slot_mapping.dtype == np.int32 and res.copies.shape == (0, 3)
    assert res.slot_mapping.tolist() == [0, 1, 2, 3, 4]
    slots, copies = tree.append(root, np.array([1, 2], dtype=np.int64))  # unpacks, casts
    assert slots.tolist() == [5, 6]
    assert tree.tokens(root).tolist() == [5, 6, 7, 8, 9, 1, 2]
    assert tree.pages(root).tolist() == [0, 1]
    assert tree.num_tokens(root) == 7 and tree.num_pages(root) == 2


def test_fork_is_refcount_free_and_shares_pages(tree, pool):
    root = tree.new_sequence()
    tree.append(root, np.arange(10))
    before = pool.debug_refcounts()
    kids = tree.fork(root, 4)
    assert len(kids) == 4 and all(isinstance(k, int) for k in kids)
    np.testing.assert_array_equal(pool.debug_refcounts(), before)
    assert pool.used == 3
    for k in kids:
        assert tree.parent(k) == root and tree.num_tokens(k) == 10
        np.testing.assert_array_equal(tree.pages(k), tree.pages(root))
    assert sorted(tree.children(root)) == sorted(kids)
    assert tree.depth(kids[0]) == 1 and tree.num_children(root) == 4


def test_copy_on_write_only_inherited_tokens(tree):
    root = tree.new_sequence()
    tree.append(root, np.arange(6))  # page 1 holds 2 tokens
    parent_pages = tree.pages(root).copy()
    a, b = tree.fork(root, 2)
    ra = tree.append(a, [100, 101, 102])
    assert ra.copies.tolist() == [[parent_pages[1], ra.copies[0, 1], 2]]
    dst = ra.copies[0, 1]
    assert ra.slot_mapping[:2].tolist() == [dst * 4 + 2, dst * 4 + 3]
    rb = tree.append(b, [200])
    assert rb.copies[0, 0] == parent_pages[1] and rb.copies[0, 1] not in (dst, parent_pages[1])
    np.testing.assert_array_equal(tree.pages(root), parent_pages)  # parent untouched
    assert tree.append(a, [7]).copies.shape == (0, 3)  # later writes are in place


def test_frozen_parent(tree):
    root = tree.new_sequence()
    tree.append(root, [1, 2, 3])
    (child,) = tree.fork(root)
    with pytest.raises(FrozenNode, match="fork it once more"):
        tree.append(root, [4])
    assert issubclass(FrozenNode, ValueError)
    with pytest.raises(FrozenNode):
        tree.truncate(root, 1)
    cont = tree.fork_one(root)  # "continue the parent" = one more fork
    tree.append(cont, [4])
    assert tree.tokens(cont).tolist() == [1, 2, 3, 4]


def test_release_cascade_and_stale_handles(tree, pool):
    root = tree.new_sequence()
    tree.append(root, np.arange(9))
    a, b = tree.fork(root, 2)
    tree.append(a, np.arange(5))
    tree.release(root)
    assert tree.is_valid(root) and tree.is_released(root)
    with pytest.raises(ValueError):
        tree.release(root)
    with pytest.raises(ValueError):
        tree.fork(root)
    assert tree.pages_freed_by_release(a) == 2  # its CoW page + one new page
    tree.release(a)
    assert tree.pages_freed_by_release(b) == 3  # b and, by cascade, root's pages
    tree.release(b)
    assert not tree.is_valid(root) and pool.used == 0 and tree.num_live_nodes == 0
    with pytest.raises(ValueError):
        tree.num_tokens(a)


def test_release_subtree(tree, pool):
    root = tree.new_sequence()
    tree.append(root, np.arange(5))
    a, b = tree.fork(root, 2)
    tree.append(a, [1])
    grand = tree.fork(a, 3)
    for g in grand:
        tree.append(g, [2, 3, 4, 5])
    tree.release_subtree(a)
    assert not any(tree.is_valid(x) for x in [a, *grand])
    assert tree.children(root) == [b]
    tree.release(b)
    tree.release(root)
    assert pool.used == 0


def test_truncate_own_segment(tree, pool):
    root = tree.new_sequence()
    tree.append(root, np.arange(10))
    (c,) = tree.fork(root)
    tree.append(c, np.arange(7))
    with pytest.raises(ValueError):
        tree.truncate(c, 9)  # inside the parent's segment
    tree.truncate(c, 12)
    assert tree.num_tokens(c) == 12 and tree.num_pages(c) == 3
    tree.truncate(c, 10)  # back to the shared page, CoW page released
    assert tree.num_pages(c) == 3 and tree.pages(c)[-1] == tree.pages(root)[-1]
    assert tree.append(c, [1]).copies.shape == (1, 3)


def test_from_prefix(tree, pool):
    a = tree.new_sequence()
    tree.append(a, np.arange(8))
    pages = tree.pages(a)
    b = tree.new_sequence_from_prefix(pages, 8, np.arange(8))
    assert pool.refcount(int(pages[0])) == 2
    assert tree.tokens(b).tolist() == list(range(8))
    with pytest.raises(ValueError):
        tree.new_sequence_from_prefix(pages[:1], 8, np.arange(8))
    with pytest.raises(ValueError):
        tree.new_sequence_from_prefix(pages, 8, np.arange(7))


def test_partial_prefix_page_is_copied_on_write(tree, pool):
    a = tree.new_sequence()
    tree.append(a, np.arange(6))
    pages = tree.pages(a)
    b = tree.new_sequence_from_prefix(pages, 6, np.arange(6))  # shares a's partial page
    # Whoever writes first while the page is shared copies it ...
    res = tree.append(a, [9])
    assert res.copies.tolist() == [[pages[1], res.copies[0, 1], 2]]
    # ... after which the other holds it alone and writes in place.
    assert pool.refcount(int(pages[1])) == 1
    res = tree.append(b, [8])
    assert res.copies.shape == (0, 3) and res.slot_mapping.tolist() == [pages[1] * 4 + 2]


def test_append_out_of_pages_is_all_or_nothing():
    pool = BlockPool(4, page_size=4)
    tree = KVTree(pool)
    r = tree.new_sequence()
    tree.append(r, np.arange(10))
    a, b = tree.fork(r, 2)
    with pytest.raises(OutOfPages):
        tree.append(a, np.arange(7))  # CoW + 2 new pages > 1 free
    assert tree.num_tokens(a) == 10 and pool.used == 3
    with pytest.raises(OutOfPages):
        tree.append_batch([a, b], [1, 1], [1, 2])  # two CoW pages, one free
    assert tree.num_tokens(a) == 10 and tree.num_tokens(b) == 10 and pool.used == 3
    assert tree.pages_needed([a, b], [1, 1]) == 2
    tree.append(a, [1])
    check_invariants(pool)


def test_append_batch(tree):
    r = tree.new_sequence()
    tree.append(r, np.arange(6))
    a, b, c = tree.fork(r, 3)
    res = tree.append_batch(np.array([a, b, c]), np.array([1, 3, 0]), np.array([10, 20, 21, 22]))
    assert len(res.slot_mapping) == 4 and res.copies.shape == (2, 3)
    assert tree.tokens(b)[-3:].tolist() == [20, 21, 22]
    with pytest.raises(ValueError):
        tree.append_batch([a, a], [1, 1], [1, 2])
    with pytest.raises(ValueError):
        tree.append_batch([a], [2], [1])


def test_export_csr(tree):
    r = tree.new_sequence()
    tree.append(r, np.arange(13))
    kids = tree.fork(r, 3)
    tree.append(kids[0], np.arange(4))
    grand = tree.fork(kids[0], 2)
    tree.append(grand[1], np.arange(9))
    leaves = [*grand, kids[1], kids[2], r]
    for _ in range(2):  # second call goes through the cached flat lists
        indptr, indices, last = tree.export_csr(np.array(leaves, dtype=np.int64))
        assert indptr.dtype == indices.dtype == last.dtype == np.int32
        for i, leaf in enumerate(leaves):
            np.testing.assert_array_equal(indices[indptr[i]:indptr[i + 1]], tree.pages(leaf))
            n = tree.num_tokens(leaf)
            assert last[i] == (n - 1) % 4 + 1
    indptr, indices, last = tree.export_csr([])
    assert indptr.tolist() == [0] and len(indices) == 0
    e = tree.new_sequence()
    indptr, _, last = tree.export_csr([e])
    assert indptr.tolist() == [0, 0] and last.tolist() == [0]


def test_deep_chain_export(tree):
    node = tree.new_sequence()
    path = []
    for i in range(50):  # beam-search-like chain: fork, extend, repeat
        tree.append(node, [i, i + 1, i + 2])
        path += [i, i + 1, i + 2]
        nxt = tree.fork_one(node)
        tree.release(node)
        node = nxt
    assert tree.depth(node) == 50
    assert tree.tokens(node).tolist() == path
    indptr, indices, _ = tree.export_csr([node])
    assert len(indices) == math.ceil(len(path) / 4)
    np.testing.assert_array_equal(indices, tree.pages(node))


def test_tree_destructor_returns_pages():
    pool = BlockPool(16, page_size=4)
    tree = KVTree(pool)
    r = tree.new_sequence()
    tree.append(r, np.arange(10))
    cache = RadixCache(pool)
    cache.insert(tree.tokens(r), tree.pages(r))
    del tree
    assert pool.used == 2  # only the cache's references remain
    del cache
    assert pool.used == 0
