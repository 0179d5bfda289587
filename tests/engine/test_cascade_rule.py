"""Cascade attention helpers (CPU): shared-prefix detection, the level split,
and `CascadeRule`, which the CUDA-graph runner uses every multi-row decode step."""

import numpy as np
import pytest
import torch

from dendrite.attention.cascade import CascadeRule, shared_prefix_pages, split_levels


def csr(rows):
    indptr = np.zeros(len(rows) + 1, dtype=np.int32)
    np.cumsum([len(r) for r in rows], out=indptr[1:])
    indices = np.concatenate([np.asarray(r, dtype=np.int32) for r in rows]) if rows else \
        np.zeros(0, np.int32)
    return indptr, indices


def brute_force(rows):
    if len(rows) < 2:
        return 0
    limit = min(len(r) for r in rows) - 1
    n = 0
    while n < limit and all(r[n] == rows[0][n] for r in rows):
        n += 1
    return n


@pytest.mark.parametrize("rows,expect", [
    ([[0, 1, 2, 3, 10], [0, 1, 2, 3, 11], [0, 1, 2, 3, 12]], 4),
    ([[0, 1, 2, 9], [0, 1, 2, 3, 11]], 3),  # the shorter row keeps its last page
    ([[0, 1, 5, 6], [0, 1, 7, 8]], 2),
    ([[0, 1, 2], [3, 1, 2]], 0),  # differ on the first page
    ([[0, 1, 2, 3]], 0),  # one row: nothing to share
    ([[0], [0]], 0),  # a single (last) page is never shared
    ([[4, 5, 6], [4, 5, 6]], 2),  # identical rows: all but the last page
    ([], 0),
])
def test_shared_prefix_pages_crafted(rows, expect):
    indptr, indices = csr(rows)
    assert shared_prefix_pages(indptr, indices) == expect == brute_force(rows)


def test_shared_prefix_pages_ignores_leading_offset_of_other_rows():
    # Same page ids at different offsets (not a prefix) do not count.
    rows = [[1, 2, 3, 4], [9, 1, 2, 3, 4]]
    indptr, indices = csr(rows)
    assert shared_prefix_pages(indptr, indices) == 0


def test_shared_prefix_pages_random_trees():
    rng = np.random.default_rng(0)
    for _ in range(300):
        b = int(rng.integers(1, 9))
        common = list(rng.integers(0, 1000, size=int(rng.integers(0, 40))))
        rows = []
        for _ in range(b):
            cut = int(rng.integers(0, len(common) + 1)) if rng.random() < 0.3 else len(common)
            own = list(rng.integers(1000, 2000, size=int(rng.integers(1, 6))))
            rows.append(common[:cut] + own)
        indptr, indices = csr(rows)
        assert shared_prefix_pages(indptr, indices) == brute_force(rows), rows
        # torch tensors and int64 arrays work too
        assert shared_prefix_pages(torch.from_numpy(indptr), indices.astype(np.int64)) == \
            brute_force(rows)


def test_split_levels_round_trip():
    rows = [[0, 1, 2, 3, 10, 11], [0, 1, 2, 3, 12], [0, 1, 2, 3, 13, 14, 15]]
    indptr, indices = csr(rows)
    shared = shared_prefix_pages(indptr, indices)
    assert shared == 4
    sidx, uptr, uidx = split_levels(indptr, indices, shared)
    assert sidx.tolist() == [0, 1, 2, 3]
    assert uptr.tolist() == [0, 2, 3, 6]
    assert uidx.tolist() == [10, 11, 12, 13, 14, 15]
    for b, r in enumerate(rows):  # shared + own == the original row
        assert sidx.tolist() + uidx[uptr[b]:uptr[b + 1]].tolist() == r
    with pytest.raises(ValueError):
        split_levels(indptr, indices, 5)  # row 1 would lose its last page


def test_split_levels_zero_shared():
    rows = [[1, 2], [3, 4]]
    indptr, indices = csr(rows)
    sidx, uptr, uidx = split_levels(indptr, indices, 0)
    assert len(sidx) == 0 and uptr.tolist() == indptr.tolist() and uidx.tolist() == [1, 2, 3, 4]


def test_rule():
    rule = CascadeRule(min_batch=4, min_shared=1024, min_saved_tokens=32768,
                       min_shared_ratio=1.0)
    # Monotone: more leaves or a longer shared prefix never turns cascade off.
    for b in (1, 2, 4, 16, 64):
        for s in (0, 512, 1024, 4096, 16384):
            for u in (16, 256, 4096):
                if rule(b, s, u):
                    assert rule(b * 2, s, u) and rule(b, s * 2, u)
    assert not rule(1, 1 << 20, 16)  # one leaf: nothing to share
    assert not rule(64, 0, 16)
    assert not rule(4, 4096, 256) and rule(16, 4096, 256)  # 12K vs 61K saved reads
    assert not rule(64, 1024, 4096)  # the own tokens outweigh the shared ones
    tree = CascadeRule(min_batch=2, min_shared=16, min_saved_tokens=0, min_shared_ratio=0)
    assert tree(2, 16, 10_000) and not tree(1, 16, 0)
    assert "min_batch=2" in repr(tree)
