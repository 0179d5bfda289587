"""Range and dtype checks of the native bindings (issue 13).

Page ids, token ids and counts are int32 in the core. The bindings used to
cast int64/float numpy arrays with numpy's forcecast, so page 2**32 became
page 0 and float token ids were truncated without a word. Now every integer
argument is checked before anything changes: a value out of range raises
ValueError naming the function and the argument, a non-integer array raises
TypeError, and the pool and tree are exactly as they were.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dendrite import _native
from dendrite.kv import BlockPool, FrozenNode, KVTree, OutOfPages, RadixCache, Scheduler, check_invariants

BIG = 2**32  # wraps to 0 when cast to int32


def _setup(num_pages: int = 16, page_size: int = 4):
    pool = BlockPool(num_pages, page_size=page_size)
    tree = KVTree(pool)
    cache = RadixCache(pool)
    root = tree.new_sequence()
    tree.append(root, np.arange(6))
    return pool, tree, cache, root


def _snapshot(pool: BlockPool, tree: KVTree, node: int):
    return (pool.used, pool.debug_refcounts().tolist(), tree.tokens(node).tolist(),
            tree.pages(node).tolist(), tree.num_live_nodes)


# -- page ids ---------------------------------------------------------------------------


def test_page_id_that_wraps_to_a_valid_page_is_rejected():
    pool, tree, cache, root = _setup()
    pages = tree.pages(root).astype(np.int64)
    before = _snapshot(pool, tree, root)
    bad = pages.copy()
    bad[0] += BIG  # == pages[0] after an int32 cast
    with pytest.raises(ValueError, match=r"new_sequence_from_prefix: pages\[0\] = 4294967296"):
        tree.new_sequence_from_prefix(bad, 6, np.arange(6))
    with pytest.raises(ValueError, match=r"decref_batch: pages\[0\]"):
        pool.decref_batch(bad)
    with pytest.raises(ValueError, match=r"insert: pages\[0\]"):
        cache.insert(np.arange(4), bad[:1])
    assert _snapshot(pool, tree, root) == before
    check_invariants(pool)


def test_decref_batch_with_a_repeated_page_is_all_or_nothing():
    pool = BlockPool(8, page_size=4)
    pages = pool.allocate_batch(2)
    with pytest.raises(ValueError, match=r"page 0 appears 3 times but has 1 reference"):
        pool.decref_batch(np.array([1, 0, 0, 0]))
    assert pool.debug_refcounts().tolist()[:2] == [1, 1]  # page 1 was not decref'd either
    check_invariants(pool, extra_refs=pages)


def test_page_id_at_num_pages_is_rejected_all_or_nothing():
    pool, tree, cache, root = _setup()
    pages = tree.pages(root)
    before = _snapshot(pool, tree, root)
    # The first id is fine: a half-applied batch would have decref'd it.
    with pytest.raises(ValueError, match=r"pages\[1\] = 16 is out of range \[0, 15\]"):
        pool.decref_batch(np.array([pages[0], 16], dtype=np.int64))
    assert _snapshot(pool, tree, root) == before
    check_invariants(pool)


@pytest.mark.parametrize("method", ["incref", "decref", "refcount"])
@pytest.mark.parametrize("page", [-1, 16, BIG, -BIG])
def test_scalar_page_ids_are_range_checked(method, page):
    pool, tree, _, root = _setup()
    before = _snapshot(pool, tree, root)
    with pytest.raises(ValueError, match=rf"{method}: page = {page} is out of range"):
        getattr(pool, method)(page)
    assert _snapshot(pool, tree, root) == before


def test_unpin_page_id_out_of_range():
    pool, tree, cache, root = _setup()
    with pytest.raises(ValueError, match=r"unpin: last_page = 4294967296"):
        cache.unpin(BIG)
    with pytest.raises(ValueError, match=r"unpin: pages\[0\] = 4294967296"):
        cache.unpin(np.array([BIG], dtype=np.int64))
    check_invariants(pool)


# -- token ids and counts -------------------------------------------------------------


@pytest.mark.parametrize("token", [-1, BIG, 2**31])
def test_append_rejects_token_ids_outside_int32_or_negative(token):
    pool, tree, _, root = _setup()
    before = _snapshot(pool, tree, root)
    with pytest.raises(ValueError, match=rf"append: tokens\[1\] = {token} is out of range"):
        tree.append(root, np.array([1, token, 2], dtype=np.int64))
    with pytest.raises(ValueError, match=r"append_batch: tokens\[0\]"):
        tree.append_batch(np.array([root]), np.array([1]), np.array([token], dtype=np.int64))
    with pytest.raises(ValueError, match=r"set_last_tokens: tokens\[0\]"):
        tree.set_last_tokens(np.array([root]), np.array([token], dtype=np.int64))
    assert _snapshot(pool, tree, root) == before
    check_invariants(pool)


def test_counts_that_wrap_are_rejected():
    pool, tree, _, root = _setup()
    before = _snapshot(pool, tree, root)
    # 2**32 + 1 used to become 1 and append one token.
    with pytest.raises(ValueError, match=r"append_batch: counts\[0\] = 4294967297"):
        tree.append_batch(np.array([root]), np.array([BIG + 1]), np.array([5]))
    with pytest.raises(ValueError, match=r"pages_needed: counts\[0\] = -1"):
        tree.pages_needed(np.array([root]), np.array([-1]))
    assert _snapshot(pool, tree, root) == before


def test_scheduler_counts_that_wrap_are_rejected():
    pool, tree, _, root = _setup()
    sched = Scheduler(token_budget=8, tree=tree)
    sched.add(root, pending_tokens=3)
    with pytest.raises(ValueError, match=r"schedule: pending\[0\] = 4294967297"):
        sched.schedule(np.array([root]), np.array([BIG + 1]))
    with pytest.raises(ValueError, match=r"advance: counts\[0\] = 4294967298"):
        sched.advance(np.array([root]), np.array([BIG + 2]))
    assert sched.pending(root) == 3


def test_radix_tokens_checked():
    pool, tree, cache, root = _setup()
    with pytest.raises(ValueError, match=r"match_prefix: tokens\[2\] = -3"):
        cache.match_prefix(np.array([0, 1, -3, 4]))
    with pytest.raises(ValueError, match=r"insert: tokens\[0\] = 4294967296"):
        cache.insert(np.array([BIG, 1, 2, 3]), tree.pages(root)[:1])
    assert cache.num_entries == 0
    check_invariants(pool)


# -- dtypes ------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.bool_, np.complex64])
def test_non_integer_arrays_are_type_errors(dtype):
    pool, tree, cache, root = _setup()
    before = _snapshot(pool, tree, root)
    with pytest.raises(TypeError, match=r"append: tokens must be a 1-D array of integers"):
        tree.append(root, np.array([1, 2], dtype=dtype))
    with pytest.raises(TypeError, match=r"append_batch: nodes must be a 1-D array of integers"):
        tree.append_batch(np.array([root], dtype=dtype), np.array([1]), np.array([1]))
    with pytest.raises(TypeError, match=r"export_csr: leaves"):
        tree.export_csr(np.array([root], dtype=dtype))
    with pytest.raises(TypeError, match=r"decref_batch: pages"):
        pool.decref_batch(tree.pages(root).astype(dtype))
    assert _snapshot(pool, tree, root) == before


def test_huge_python_ints_in_lists_are_rejected():
    pool, tree, _, root = _setup()
    before = _snapshot(pool, tree, root)
    with pytest.raises((TypeError, ValueError, OverflowError), match="tokens"):
        tree.append(root, [1, 2**70])
    with pytest.raises(ValueError, match=r"tokens\[0\] = 18446744073709551615"):
        tree.append(root, np.array([2**64 - 1], dtype=np.uint64))
    assert _snapshot(pool, tree, root) == before


def test_empty_lists_and_narrow_dtypes_still_work():
    pool, tree, cache, root = _setup()
    assert len(tree.append(root, []).slot_mapping) == 0  # np.asarray([]) is float64
    tree.append(root, np.array([7, 8], dtype=np.uint8))
    tree.append(root, np.array([9], dtype=np.int16))
    assert tree.tokens(root).tolist()[-3:] == [7, 8, 9]
    check_invariants(pool)


# -- scalars and sizes -----------------------------------------------------------------------


@pytest.mark.parametrize("kw, name", [
    (dict(num_pages=0), "num_pages"),
    (dict(num_pages=-1), "num_pages"),
    (dict(num_pages=2**31), "num_pages"),
    (dict(num_pages=8, page_size=0), "page_size"),
    (dict(num_pages=8, page_size=2**32), "page_size"),
    (dict(num_pages=8, cow_headroom=9), "cow_headroom"),
    (dict(num_pages=8, cow_headroom=-1), "cow_headroom"),
])
def test_block_pool_sizes_name_the_argument(kw, name):
    with pytest.raises(ValueError, match=name):
        BlockPool(**kw)


@pytest.mark.parametrize("kw, name", [
    (dict(num_pages=8.0), "num_pages"),
    (dict(num_pages=8, page_size=4.5), "page_size"),
    (dict(num_pages="8"), "num_pages"),
    (dict(num_pages=True), "num_pages"),
])
def test_block_pool_sizes_must_be_ints(kw, name):
    with pytest.raises(TypeError, match=name):
        BlockPool(**kw)


def test_fork_of_absurd_count_changes_nothing():
    pool, tree, _, root = _setup()
    live = tree.num_live_nodes
    with pytest.raises(ValueError, match="fork: n"):
        tree.fork(root, 2**40)
    assert tree.num_live_nodes == live and tree.num_children(root) == 0
    tree.append(root, [1])  # not frozen
    check_invariants(pool)


def test_plan_tree_attention_rejects_wrong_output_dtype():
    indptr = np.array([0, 2], dtype=np.int32)
    last = np.array([3], dtype=np.int32)
    items = np.zeros(6 * 8, dtype=np.int64)  # a forcecast copy would swallow the output
    with pytest.raises(TypeError, match="items_out"):
        _native.plan_tree_attention(indptr, last, 0, 4, 1, 4, 4, 8, 16, items,
                                    np.zeros(1, dtype=np.int32))


# -- fuzz -----------------------------------------------------------------------------------

EXPECTED = (ValueError, TypeError, OverflowError, OutOfPages, FrozenNode)

_values = st.one_of(
    st.integers(-3, 40),
    st.integers(-2**63, 2**63 - 1),
    st.sampled_from([2**31 - 1, 2**31, 2**32, 2**32 + 1, -2**31 - 1, -2**31]),
)
_arrays = st.one_of(
    st.lists(_values, max_size=6).map(lambda v: np.array(v, dtype=np.int64)),
    st.lists(st.floats(allow_infinity=True, allow_nan=True), max_size=4).map(np.array),
    st.lists(st.integers(0, 2**64 - 1), max_size=3).map(lambda v: np.array(v, dtype=np.uint64)),
    st.lists(st.integers(-5, 40), max_size=6),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(op=st.sampled_from([
    "append", "append_batch", "pages_needed", "set_last_tokens", "from_prefix", "export_csr",
    "decref_batch", "match_prefix", "insert", "unpin", "schedule", "advance", "incref",
    "truncate", "fork",
]), a=_arrays, b=_arrays, c=_arrays, s=_values)
def test_fuzz_bindings_error_or_work_and_stay_consistent(op, a, b, c, s):
    pool, tree, cache, root = _setup()
    child = tree.fork_one(root)
    nodes = np.array([root, child], dtype=np.int64)
    sched = Scheduler(token_budget=8, tree=tree)
    sched.add(child, pending_tokens=2)
    # Direct refcount ops run on a pool of their own: on the tree's pool a
    # successful decref of a tree page would be a (legal) caller bug.
    loose = BlockPool(16, page_size=4)
    loose.allocate_batch(3)
    loose.incref(1)
    refcounts = pool.debug_refcounts().tolist()
    loose_refcounts = loose.debug_refcounts().astype(np.int64)
    calls = {
        "append": lambda: tree.append(child, a),
        "append_batch": lambda: tree.append_batch(b if len(b) else nodes[1:], a, c),
        "pages_needed": lambda: tree.pages_needed(b, a),
        "set_last_tokens": lambda: tree.set_last_tokens(b, a),
        "from_prefix": lambda: tree.new_sequence_from_prefix(a, s, b),
        "export_csr": lambda: tree.export_csr(a),
        "decref_batch": lambda: loose.decref_batch(a),
        "match_prefix": lambda: cache.match_prefix(a),
        "insert": lambda: cache.insert(a, b),
        "unpin": lambda: cache.unpin(a),
        "schedule": lambda: sched.schedule(b, a),
        "advance": lambda: sched.advance(b, a),
        "incref": lambda: loose.incref(s),
        "truncate": lambda: tree.truncate(child, s),
        "fork": lambda: tree.fork(child, s % 5 if abs(s) < 2**20 else s),
    }
    # The arguments each op narrows to int32 (ids and counts, all >= 0).
    narrowed = {"append": [a], "append_batch": [a, c], "pages_needed": [a],
                "set_last_tokens": [a], "from_prefix": [a, b], "decref_batch": [a],
                "match_prefix": [a], "insert": [a, b], "unpin": [a], "schedule": [a],
                "advance": [a]}.get(op, [])
    try:
        calls[op]()
    except EXPECTED:
        assert pool.debug_refcounts().tolist() == refcounts, f"{op} raised but changed the pool"
        assert (loose.debug_refcounts() == loose_refcounts).all(), f"{op} changed the pool"
    else:
        for arr in map(np.asarray, narrowed):  # success means nothing was cast or wrapped
            assert arr.size == 0 or (arr.dtype.kind in "iu" and 0 <= arr.min()
                                     and arr.max() < 2**31), f"{op} accepted {arr!r}"
        if op == "decref_batch":
            loose_refcounts -= np.bincount(np.asarray(a, dtype=np.int64), minlength=16)
        elif op == "incref":
            loose_refcounts[s] += 1
    # Ops that worked may have taken pages (append, from_prefix, insert).
    check_invariants(pool)
    assert (loose.debug_refcounts() == loose_refcounts).all()
    held = np.repeat(np.arange(16), loose_refcounts)
    check_invariants(loose, extra_refs=held if held.size else None)
