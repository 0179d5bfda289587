"""Shared-prefix helpers of cascade attention: which pages a decode step's rows
share, the two levels' page tables, and the rule that picks cascade.

When B leaves of one tree decode together, flat paged decode reads the common
prefix once per leaf; cascade attention reads it once for all of them (the
shared pages as one level, each leaf's own pages as the other, merged). The
CUDA-graph runner (dendrite/model/cuda_graph.py) asks `shared_prefix_pages`
every multi-row decode step, splits the levels with `split_levels` for
FlashInfer's two-level graphs, and decides with a `CascadeRule`
(`GRAPH_CASCADE_RULE` / `GRAPH_TREE_RULE` there). Every page the shared level
holds is full (the prefix is cut at page granularity and never includes a
leaf's last page), and every leaf keeps at least its last page to itself, so
both levels are well formed.

Plain numpy and the native core: runs (and is tested) on the CPU.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["CascadeRule", "shared_prefix_pages", "split_levels"]


# -- shared prefix ----------------------------------------------------------------------
def shared_prefix_pages(kv_indptr: Any, kv_indices: Any) -> int:
    """Longest common full-page prefix across the batch, in pages.

    Rows are the CSR segments `kv_indices[kv_indptr[b]:kv_indptr[b+1]]`. Only
    pages every row holds before its last page count (those are full by the
    paged-KV contract, and each row keeps its last page to itself), so the
    result is at most `min_b(pages_b) - 1`. 0 for fewer than 2 rows.
    Runs in the native core: every multi-row decode step asks (numpy took
    ~60 us for 16 rows over 4K tokens).
    """
    from dendrite import _native  # noqa: PLC0415

    return int(_native.shared_prefix_pages(np.asarray(kv_indptr, dtype=np.int32),
                                           np.asarray(kv_indices, dtype=np.int32)))


def split_levels(kv_indptr: Any, kv_indices: Any, shared: int) -> tuple[np.ndarray, np.ndarray,
                                                                         np.ndarray]:
    """The two cascade levels' page tables for `shared` common pages.

    Returns `(shared_indices [shared], unique_indptr [B+1], unique_indices)`:
    level 0 is `shared_indices` as one entry; level 1 is every row without its
    first `shared` pages (its last page length is unchanged).
    """
    indptr = np.asarray(kv_indptr, dtype=np.int64)
    indices = np.asarray(kv_indices, dtype=np.int32)
    b = len(indptr) - 1
    if shared < 0 or (b and shared > int(np.diff(indptr).min()) - 1):
        raise ValueError(f"shared={shared} pages does not leave every row its last page")
    shared_idx = indices[indptr[0]:indptr[0] + shared].copy()
    unique_indptr = (indptr - shared * np.arange(b + 1)).astype(np.int32)
    if shared == 0:
        return shared_idx, unique_indptr, indices.copy()
    keep = np.ones(len(indices), dtype=bool)
    keep[(indptr[:-1, None] + np.arange(shared)[None, :]).ravel()] = False
    return shared_idx, unique_indptr, indices[keep]


# -- the rule ---------------------------------------------------------------------------
# -- the rule ---------------------------------------------------------------------------
class CascadeRule:
    """When a decode step runs as cascade rather than flat paged decode:

        batch >= min_batch
        and shared_tokens >= min_shared
        and (batch - 1) * shared_tokens >= min_saved_tokens
        and shared_tokens >= min_shared_ratio * unique_tokens

    (`unique_tokens`: the rows' own tokens, on average). The thresholds are
    measurements: see `GRAPH_CASCADE_RULE` and `GRAPH_TREE_RULE`
    (dendrite/model/cuda_graph.py).
    """

    def __init__(self, min_batch: int, min_shared: int, min_saved_tokens: int,
                 min_shared_ratio: float) -> None:
        self.min_batch = min_batch
        self.min_shared = min_shared
        self.min_saved_tokens = min_saved_tokens
        self.min_shared_ratio = min_shared_ratio

    def __call__(self, batch: int, shared_tokens: int, unique_tokens: float) -> bool:
        return (batch >= self.min_batch and shared_tokens >= self.min_shared
                and (batch - 1) * shared_tokens >= self.min_saved_tokens
                and shared_tokens >= self.min_shared_ratio * unique_tokens)

    def __repr__(self) -> str:
        return (f"CascadeRule(min_batch={self.min_batch}, min_shared={self.min_shared}, "
                f"min_saved_tokens={self.min_saved_tokens}, "
                f"min_shared_ratio={self.min_shared_ratio})")
