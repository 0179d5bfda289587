"""The tree-attention work planner (dendrite/kernels/tree_attention.py), on the CPU.

Properties every plan must have, whatever the page tables: each leaf's
tokens are covered exactly once (the shared range by items of a tile that
holds the leaf, the rest by the leaf's own items), each item owns a distinct
split slot of each of its leaves, and the limits on slots and items hold.
The kernels themselves run in tests/kernels/test_tree_attention_gpu.py and, through
Triton's interpreter, in test_tree_attention_interpreted.py.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dendrite.kernels.tree_attention import ITEM_FIELDS, plan_work

PAGE = 16


def tables(own_pages: list[int], lasts: list[int], shared: int) -> tuple[np.ndarray, np.ndarray]:
    pages = np.asarray(own_pages) + shared
    indptr = np.zeros(len(pages) + 1, dtype=np.int32)
    np.cumsum(pages, out=indptr[1:])
    return indptr, np.asarray(lasts, dtype=np.int32)


def check(indptr, last, shared, wp, *, leaves_per_tile, max_splits, max_items, block_n):
    b = len(indptr) - 1
    items = wp.items
    assert items.shape[1] == len(ITEM_FIELDS)
    assert len(items) <= max_items
    assert wp.tokens_per_item % block_n == 0
    lens = (np.diff(indptr) - 1) * PAGE + last
    covered = [np.zeros(n, dtype=np.int32) for n in lens]
    slots: list[set[int]] = [set() for _ in range(b)]
    for leaf0, n, page_off, start, end, split in items.tolist():
        assert 1 <= n <= leaves_per_tile and leaf0 + n <= b
        assert 0 <= start < end and end - start <= wp.tokens_per_item
        assert 0 <= split < max_splits
        assert page_off == indptr[leaf0]  # a shared range is every tile leaf's, so the first's
        if n > 1 or end <= shared * PAGE:  # a shared item: the prefix only
            assert end <= shared * PAGE
            assert leaf0 % leaves_per_tile == 0
        else:  # a leaf's own item
            assert start >= shared * PAGE
        for leaf in range(leaf0, leaf0 + n):
            covered[leaf][start:end] += 1
            assert split not in slots[leaf]
            slots[leaf].add(split)
    for leaf in range(b):
        assert (covered[leaf] == 1).all(), f"leaf {leaf}: tokens covered {covered[leaf]}"
        assert wp.splits[leaf] == len(slots[leaf])
        assert slots[leaf] == set(range(len(slots[leaf])))  # slots 0..n-1: the merge reads those


@settings(max_examples=150, deadline=None)
@given(st.integers(1, 40).flatmap(lambda b: st.tuples(
    st.lists(st.integers(1, 40), min_size=b, max_size=b),
    st.lists(st.integers(1, PAGE), min_size=b, max_size=b),
    st.integers(0, 300), st.integers(1, 64), st.sampled_from([1, 4, 16]),
    st.sampled_from([8, 32, 64]), st.sampled_from([16, 64]))))
def test_plans_cover_every_token_once(case):
    own, lasts, shared, target, tile, max_splits, block_n = case
    indptr, last = tables(own, lasts, shared)
    b = len(own)
    max_items = max(4 * target, -(-b // tile) + b)
    wp = plan_work(indptr, last, PAGE, shared, leaves_per_tile=tile, target_items=target,
                   max_splits=max_splits, max_items=max_items, block_n=block_n)
    check(indptr, last, shared, wp, leaves_per_tile=tile, max_splits=max_splits,
          max_items=max_items, block_n=block_n)


def test_sixteen_leaves_over_4k_split_the_prefix_once():
    """The issue's shape: 16 leaves share 256 pages; the prefix is read by one
    tile (16 leaves), in about `target` pieces, each leaf's few own tokens by one item."""
    indptr, last = tables([1] * 16, [5] * 16, 256)
    wp = plan_work(indptr, last, PAGE, 256, leaves_per_tile=16, target_items=33,
                   max_splits=64, max_items=132, block_n=64)
    shared_items = wp.items[wp.items[:, 1] == 16]
    assert len(shared_items) == -(-4096 // wp.tokens_per_item)
    assert len(wp.items) == len(shared_items) + 16
    assert 20 <= len(wp.items) <= 50


def test_long_own_ranges_lengthen_the_items_to_fit_the_slots():
    indptr, last = tables([1, 3000], [16, 1], 0)  # one leaf of 48K tokens
    wp = plan_work(indptr, last, PAGE, 0, leaves_per_tile=16, target_items=200,
                   max_splits=8, max_items=1000, block_n=64)
    assert wp.splits.max() <= 8
    check(indptr, last, 0, wp, leaves_per_tile=16, max_splits=8, max_items=1000, block_n=64)


@pytest.mark.parametrize("bad", ["empty row", "last page", "shared too long"])
def test_malformed_tables_are_refused(bad):
    indptr, last = tables([1, 2], [3, 4], 2)
    shared = 2
    if bad == "empty row":
        indptr = np.array([0, 0, 5], dtype=np.int32)
    elif bad == "last page":
        last = np.array([0, 4], dtype=np.int32)
    else:
        shared = 3
    with pytest.raises(ValueError):
        plan_work(indptr, last, PAGE, shared, leaves_per_tile=4, target_items=8,
                  max_splits=16, max_items=64, block_n=16)
