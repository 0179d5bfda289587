"""The paged KV cache bookkeeping: the native classes, their shared rules, a checker.

The engine-facing API, implemented in C++ (`dendrite._native`, typed by
`dendrite/_native.pyi`) and re-exported here as it is:

* `BlockPool`  - refcounted pages with a free list and copy-on-write headroom.
* `KVTree`     - token sequences as a tree; O(1) `fork`, `append` returning the
  slot mapping and copy-on-write instructions, FlashInfer CSR export.
* `RadixCache` - page-granular prefix cache (token ids -> pages), LRU/TTL.
* `Scheduler`  - runnable leaves by priority, per-step token budget, chunked
  prefill, preemption order (mechanism only; policy stays in the engine).
* `AppendResult` - what `KVTree.append` returns (`slots, copies = result`).
* `OutOfPages`, `FrozenNode`, `ArgumentRangeError` - their errors.
* `check_invariants` - independent consistency check used by the tests
  (defined here, in Python, so it does not trust the code it checks).

All structures sharing one `BlockPool` use one refcount scheme: every page
reference is held by exactly one tree node's own page list or one cache
entry. A tree or cache keeps its pool alive, and the pool knows its live
trees and caches (`debug_trees()`, `debug_caches()`). Node handles are `int`
(int64); token/page arrays are numpy int32. Nothing here is thread-safe:
drive a pool and its users from one thread.

Accepted arguments: arrays may have any integer dtype (or be sequences numpy
turns into one); they are narrowed to int32 with range checks, never by a
silent cast. Token ids and counts must lie in [0, 2**31 - 1], page ids in
[0, num_pages). A value out of range raises `ArgumentRangeError` (a
ValueError, and an IndexError for page ids) naming the call, the argument and
the index, e.g. "append: tokens[3] = -1 is out of range [0, 2147483647]"; a
float, bool or object array raises TypeError; arrays that must pair up
(`nodes`/`counts`) raise ValueError when their lengths differ. The sizes of
`BlockPool` and `Scheduler` must be ints (numpy integers too, not bool or
float: TypeError naming the argument). Every such error is raised before
anything changes.
"""

from __future__ import annotations

from typing import Iterable, Optional

import numpy as np
from numpy.typing import ArrayLike, NDArray

try:
    from dendrite._native import (AppendResult, ArgumentRangeError, BlockPool, FrozenNode, KVTree,
                                  OutOfPages, RadixCache, Scheduler)
except ImportError as exc:  # pragma: no cover - only without a built module
    raise ImportError(
        "dendrite._native is not built. Install the package (`pip install .`, or "
        "`pip install --no-build-isolation -e .` for development) and do not run "
        "Python from a directory where ./dendrite shadows the installed package "
        "unless it is an editable install.") from exc

__all__ = [
    "AppendResult", "ArgumentRangeError", "BlockPool", "FrozenNode", "InvariantError", "KVTree", "OutOfPages",
    "RadixCache", "Scheduler", "check_invariants",
]


class InvariantError(AssertionError):
    """`check_invariants` found an inconsistency (message lists all problems)."""


def check_invariants(pool: BlockPool, trees: Optional[Iterable[KVTree]] = None,
                     caches: Optional[Iterable[RadixCache]] = None,
                     extra_refs: Optional[ArrayLike] = None) -> None:
    """Raise `InvariantError` unless the pool and its users are consistent.

    Checked (independently of the native bookkeeping, from its raw arrays):
    every page's refcount equals the references held by tree nodes plus cache
    entries; the free list holds exactly the zero-ref pages, once each; `used`
    matches; parent links have no cycles; every live node's pages are valid
    allocated pages; with no live node and no cache entry, zero pages are used.
    Plus each structure's native `validate()`, and that each uses `pool`. By
    default `trees`/`caches` are all live ones created on `pool` (the pool
    tracks them: `pool.debug_trees()`, `pool.debug_caches()`); `extra_refs`
    lists page ids referenced directly by the caller (one reference per
    occurrence). O(pages + nodes); meant for tests.
    """
    live_trees, live_caches = pool.debug_trees(), pool.debug_caches()
    trees = live_trees if trees is None else list(trees)
    caches = live_caches if caches is None else list(caches)
    checked: list[KVTree | RadixCache] = [*trees, *caches]
    foreign = [f"{type(u).__name__} #{i} uses another pool"
               for i, u in enumerate(checked) if u.pool is not pool]
    if foreign:  # their page arrays do not even have this pool's length
        raise InvariantError("\n".join(foreign))
    problems: list[str] = []
    rc = pool.debug_refcounts().astype(np.int64)
    refs = np.zeros_like(rc)
    if extra_refs is not None:
        np.add.at(refs, np.asarray(extra_refs, dtype=np.int64), 1)
    for t in trees:
        problems += t.validate()
        refs += t.debug_page_refs()
    for c in caches:
        problems += c.validate()
        refs += c.debug_page_refs()

    for p in np.flatnonzero(rc != refs)[:10]:
        problems.append(f"page {p}: refcount {rc[p]} but {refs[p]} references")
    free = pool.debug_free_list()
    uniq, times = np.unique(free, return_counts=True)
    if (times > 1).any():
        problems.append(f"pages on the free list more than once: {uniq[times > 1][:10].tolist()}")
    if not np.array_equal(uniq, np.flatnonzero(rc == 0)):
        problems.append("free list is not exactly the set of zero-refcount pages")
    if (rc < 0).any():
        problems.append("negative refcount")
    if pool.used != int(np.count_nonzero(rc)) or pool.free != len(free):
        problems.append(f"used={pool.used} free={pool.free} disagree with the refcounts")

    for t in trees:
        problems += _check_tree_structure(t, rc)
    # Only when every holder of references was checked: a tree or cache the
    # caller left out of `trees`/`caches` may legitimately hold the pages.
    # pybind11 hands back the existing wrapper of a live object, so `is` works.
    checked_all = all(any(u is x for x in checked) for u in [*live_trees, *live_caches])
    if (all(t.num_live_nodes == 0 for t in trees) and all(c.num_entries == 0 for c in caches)
            and extra_refs is None and pool.used != 0 and checked_all):
        problems.append(f"nothing holds pages but {pool.used} pages are used")
    if problems:
        raise InvariantError("\n".join(problems))


def _check_tree_structure(tree: KVTree, rc: NDArray[np.int64]) -> list[str]:
    """No cycles (pointer doubling over parent links) and valid pages."""
    problems: list[str] = []
    handles = tree.debug_live_nodes()
    parents = tree.debug_parents()
    n = len(handles)
    if n == 0:
        return problems
    order = np.argsort(handles)
    pos = np.searchsorted(handles[order], parents)
    pos = np.minimum(pos, n - 1)
    found = handles[order][pos] == parents
    if ((parents >= 0) & ~found).any():
        problems.append("a live node's parent is not live")
    up = np.where(found & (parents >= 0), order[pos], -1)
    # After k doublings up[i] is the 2^k-th ancestor; in a forest of n nodes
    # every chain ends (-1) within n steps, so anything left is a cycle.
    for _ in range(int(n).bit_length() + 1):
        up = np.where(up >= 0, up[np.maximum(up, 0)], -1)
    if (up >= 0).any():
        problems.append("parent links contain a cycle")
        return problems
    _, indices, _ = tree.export_csr(handles)
    if len(indices) and ((indices < 0).any() or (indices >= len(rc)).any()):
        problems.append("a live node references an out-of-range page")
    elif len(indices) and (rc[indices] <= 0).any():
        problems.append("a live node references a free page")
    return problems
