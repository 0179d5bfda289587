"""Typed Python layer over the native KV core (`dendrite._native`).

The engine-facing API of the paged KV cache bookkeeping:

* `BlockPool`  - refcounted pages with a free list and copy-on-write headroom.
* `KVTree`     - token sequences as a tree; O(1) `fork`, `append` returning the
  slot mapping and copy-on-write instructions, FlashInfer CSR export.
* `RadixCache` - page-granular prefix cache (token ids -> pages), LRU/TTL.
* `Scheduler`  - runnable leaves by priority, per-step token budget, chunked
  prefill, preemption order (mechanism only; policy stays in the engine).
* `check_invariants` - independent consistency check used by the tests.

All structures sharing one `BlockPool` use one refcount scheme: every page
reference is held by exactly one tree node's own page list or one cache
entry. Node handles are `int` (int64); token/page arrays are numpy int32.
Nothing here is thread-safe: drive a pool and its users from one thread.

Accepted arguments: arrays may have any integer dtype (or be sequences numpy
turns into one); they are narrowed to int32 with range checks, never by a
silent cast. Token ids and counts must lie in [0, 2**31 - 1], page ids in
[0, num_pages). A value out of range raises `ArgumentRangeError` (a
ValueError, and an IndexError for page ids) naming the call, the argument and
the index, e.g. "append: tokens[3] = -1 is out of range [0, 2147483647]"; a
float, bool or object array raises TypeError; arrays that must pair up
(`nodes`/`counts`) raise ValueError when their lengths differ. Every such
error is raised before anything changes.
"""

from __future__ import annotations

import operator
import weakref
from typing import Iterable, Optional

import numpy as np
from numpy.typing import ArrayLike, NDArray

try:
    from dendrite import _native
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

#: Raised when the pool cannot satisfy an allocation; nothing was changed
#: (all-or-nothing), so the caller may evict or preempt and retry.
#: Subclass of RuntimeError.
OutOfPages = _native.OutOfPages

#: Raised when appending to / truncating a node that has children: its pages
#: are shared read-only. Fork it once more to continue it. Subclass of ValueError.
FrozenNode = _native.FrozenNode

#: An integer argument out of its range (page id >= num_pages, negative token
#: id or count, a value past int32). Subclass of ValueError and IndexError.
ArgumentRangeError = _native.ArgumentRangeError

#: Result of `KVTree.append`/`append_batch`: `slot_mapping` int32 [T] (where
#: each new token's K/V goes: page * page_size + offset) and `copies` int32
#: [m, 3] rows (src_page, dst_page, num_tokens) to execute on the device
#: *before* writing this step's K/V. Unpacks as `slots, copies = result`.
AppendResult = _native.AppendResult

I32 = NDArray[np.int32]
I64 = NDArray[np.int64]


class InvariantError(AssertionError):
    """`check_invariants` found an inconsistency (message lists all problems)."""


def _int_arg(owner: str, name: str, value: object, lo: int, hi: int = 2**31 - 1) -> int:
    """`value` as an int in [lo, hi], else TypeError/ValueError naming `owner`.`name`.

    bool is refused although it is an int: `BlockPool(True)` is a bug, not one page.
    """
    if isinstance(value, bool):
        raise TypeError(f"{owner}: {name} must be an int, got bool {value!r}")
    try:
        v = operator.index(value)  # int and numpy integers; not float or str
    except TypeError:
        raise TypeError(
            f"{owner}: {name} must be an int, got {type(value).__name__} {value!r}") from None
    if not lo <= v <= hi:
        raise ValueError(f"{owner}: {name} = {v} is out of range [{lo}, {hi}]")
    return v


class BlockPool:
    """Fixed set of `num_pages` KV pages of `page_size` tokens, refcounted.

    Page ids are int32 in [0, num_pages); the slot of offset `o` in page `p` is
    `p * page_size + o`. `cow_headroom` pages are reserved for copy-on-write
    copies so forked children can always make their first write.

    `num_pages` >= 1 and `page_size` >= 1 with `num_pages * page_size` < 2**31
    (slots are int32), `cow_headroom` in [0, num_pages]; all plain ints
    (TypeError otherwise, ValueError when out of range, each naming the argument).
    """

    __slots__ = ("_native", "_users", "__weakref__")

    def __init__(self, num_pages: int, page_size: int = 16, cow_headroom: int = 0) -> None:
        num_pages = _int_arg("BlockPool", "num_pages", num_pages, 1)
        page_size = _int_arg("BlockPool", "page_size", page_size, 1)
        cow_headroom = _int_arg("BlockPool", "cow_headroom", cow_headroom, 0, num_pages)
        if num_pages * page_size > 2**31 - 1:
            raise ValueError(f"BlockPool: num_pages * page_size = {num_pages} * {page_size} "
                             f"must be < 2**31 (slot ids are int32)")
        self._native = _native.BlockPool(num_pages, page_size, cow_headroom)
        self._users: weakref.WeakSet = weakref.WeakSet()  # KVTrees / RadixCaches on this pool

    @property
    def num_pages(self) -> int:
        return self._native.num_pages

    @property
    def page_size(self) -> int:
        return self._native.page_size

    @property
    def cow_headroom(self) -> int:
        return self._native.cow_headroom

    @property
    def used(self) -> int:
        """Pages with a nonzero refcount."""
        return self._native.used

    @property
    def free(self) -> int:
        """Pages on the free list (headroom included)."""
        return self._native.free

    @property
    def high_watermark(self) -> int:
        """Most pages ever used at once (since construction or the last reset)."""
        return self._native.high_watermark

    def reset_high_watermark(self) -> None:
        self._native.reset_high_watermark()

    def can_allocate(self, n: int, cow: int = 0) -> bool:
        """Whether `n` ordinary plus `cow` copy-on-write pages fit right now."""
        return self._native.can_allocate(n, cow)

    def allocate(self) -> int:
        """One page with refcount 1. Raises OutOfPages (pool unchanged)."""
        return self._native.allocate()

    def allocate_batch(self, n: int, for_cow: bool = False) -> I32:
        """`n` pages with refcount 1, all or nothing. `for_cow` may use the headroom."""
        return self._native.allocate_batch(n, for_cow)

    def incref(self, page: int) -> None:
        self._native.incref(page)

    def decref(self, page: int) -> bool:
        """Drop one reference; True when the page went back to the free list."""
        return self._native.decref(page)

    def decref_batch(self, pages: ArrayLike) -> None:
        self._native.decref_batch(pages)

    def refcount(self, page: int) -> int:
        return self._native.refcount(page)

    def debug_refcounts(self) -> I32:
        """Copy of every page's refcount (int32 [num_pages])."""
        return self._native.debug_refcounts()

    def debug_free_list(self) -> I32:
        """Copy of the free list (int32, top of the stack last)."""
        return self._native.debug_free_list()

    def check_invariants(self) -> None:
        """`check_invariants` over this pool and every live tree/cache using it."""
        check_invariants(self)

    def __repr__(self) -> str:
        return (f"BlockPool(num_pages={self.num_pages}, page_size={self.page_size}, "
                f"used={self.used}, free={self.free}, high_watermark={self.high_watermark})")


class KVTree:
    """Token sequences as a tree over a `BlockPool`, with O(1) copy-on-write fork.

    A node is a segment of tokens after its parent's; it owns only the pages its
    segment wrote. `fork` creates children that read the parent's pages without
    touching any refcount. A node with children is frozen (`append` raises
    `FrozenNode`): continue it by forking it once more. A child's first write
    into the parent's partly filled last page allocates a private page and
    returns a copy instruction; the parent's slots are never written.
    """

    __slots__ = ("_native", "pool", "__weakref__")

    def __init__(self, pool: BlockPool) -> None:
        self.pool = pool
        self._native = _native.KVTree(pool._native)
        pool._users.add(self)

    # -- creation --------------------------------------------------------------
    def new_sequence(self) -> int:
        """An empty root sequence."""
        return self._native.new_sequence()

    def new_sequence_from_prefix(self, pages: ArrayLike, num_tokens: int,
                                 tokens: ArrayLike) -> int:
        """A root whose first `num_tokens` tokens (`tokens`) are already in `pages`.

        Typically a `RadixCache.match_prefix` hit. Increfs the pages (the node
        owns those references); `len(pages)` must be `ceil(num_tokens / page_size)`.
        """
        return self._native.new_sequence_from_prefix(pages, num_tokens, tokens)

    def fork(self, node: int, n: int = 1) -> list[int]:
        """`n` children of `node`, O(1) each; no page refcount changes. Freezes `node`.

        All or nothing: `n` < 0, or more than the node handles left (2**31 - 1
        per tree), raises ValueError before any child exists."""
        return self._native.fork(node, n)

    def fork_one(self, node: int) -> int:
        """`fork(node, 1)[0]` without building a list."""
        return self._native.fork_one(node)

    # -- writes ------------------------------------------------------------------
    def append(self, node: int, tokens: ArrayLike) -> AppendResult:
        """Append tokens (ids in [0, 2**31 - 1]) to leaf `node`: slot mapping +
        copy-on-write copies.

        All or nothing: on `OutOfPages`, or a bad argument, nothing changed.
        """
        return self._native.append(node, tokens)

    def append_batch(self, nodes: ArrayLike, counts: ArrayLike, tokens: ArrayLike) -> AppendResult:
        """Append `counts[b]` tokens (consecutive in `tokens`) to each distinct leaf
        `nodes[b]`; slot_mapping follows `tokens`. All or nothing over the batch.

        `len(nodes) == len(counts)`, counts >= 0 summing to `len(tokens)`,
        token ids in [0, 2**31 - 1]."""
        return self._native.append_batch(nodes, counts, tokens)

    def pages_needed(self, nodes: ArrayLike, counts: ArrayLike) -> int:
        """Pages `append_batch(nodes, counts, ...)` would allocate (incl. copies)."""
        return self._native.pages_needed(nodes, counts)

    def truncate(self, node: int, num_tokens: int) -> None:
        """Drop tokens from the end of leaf `node`'s own segment (rollback)."""
        self._native.truncate(node, num_tokens)

    def set_last_tokens(self, nodes: ArrayLike, tokens: ArrayLike) -> None:
        """Set the id of each leaf's last own token (placeholders appended by a
        step launched before the previous step's tokens were read)."""
        self._native.set_last_tokens(nodes, tokens)

    # -- release -----------------------------------------------------------------
    def release(self, node: int) -> None:
        """Drop the caller's handle. The node is freed once it has no children,
        and so are ancestors left without children and without a handle."""
        self._native.release(node)

    def release_subtree(self, node: int) -> None:
        """Free `node` and all its descendants (their handles become invalid)."""
        self._native.release_subtree(node)

    def pages_freed_by_release(self, node: int) -> int:
        """Pages `release(node)` would give back to the pool right now."""
        return self._native.pages_freed_by_release(node)

    # -- queries -----------------------------------------------------------------
    def is_valid(self, node: int) -> bool:
        """Whether `node` is a live handle (released interior nodes are live)."""
        return self._native.is_valid(node)

    def is_released(self, node: int) -> bool:
        """Live, but the caller's handle was released (kept alive by children)."""
        return self._native.is_released(node)

    def num_tokens(self, node: int) -> int:
        return self._native.num_tokens(node)

    def num_pages(self, node: int) -> int:
        """Pages of the whole path: ceil(num_tokens / page_size)."""
        return self._native.num_pages(node)

    def tokens(self, node: int) -> I32:
        """All token ids of the path from the root (int32 [num_tokens])."""
        return self._native.tokens(node)

    def pages(self, node: int) -> I32:
        """All page ids of the path from the root (int32 [num_pages])."""
        return self._native.pages(node)

    def parent(self, node: int) -> int:
        """Parent handle, -1 for a root."""
        return self._native.parent(node)

    def children(self, node: int) -> list[int]:
        return self._native.children(node)

    def num_children(self, node: int) -> int:
        return self._native.num_children(node)

    def depth(self, node: int) -> int:
        return self._native.depth(node)

    @property
    def num_live_nodes(self) -> int:
        return self._native.num_live_nodes

    def export_csr(self, leaves: ArrayLike) -> tuple[I32, I32, I32]:
        """FlashInfer paged-KV layout for `leaves` (any live nodes):
        `(kv_indptr [B+1], kv_indices [nnz], kv_last_page_len [B])`, int32,
        built by memcpy of cached flattened page lists."""
        return self._native.export_csr(leaves)

    def check_invariants(self) -> None:
        check_invariants(self.pool)


class RadixCache:
    """Page-granular prefix cache over token ids sharing the pool's refcounts.

    Each entry is one full page (page_size token ids) holding one reference.
    `match_prefix` pins the match until `unpin`; eviction takes unpinned
    leaves in LRU order. Times default to the monotonic clock
    (`time.monotonic()`), or pass `now` explicitly.
    """

    __slots__ = ("_native", "pool", "__weakref__")

    def __init__(self, pool: BlockPool) -> None:
        self.pool = pool
        self._native = _native.RadixCache(pool._native)
        pool._users.add(self)

    def match_prefix(self, tokens: ArrayLike, now: Optional[float] = None,
                     pin: bool = True) -> tuple[int, I32]:
        """Longest cached page-aligned prefix: `(num_tokens, pages)`. Pinned
        (when `pin` and non-empty) until `unpin(pages)`."""
        return self._native.match_prefix(tokens, now, pin)

    def unpin(self, pages: "ArrayLike | int") -> None:
        """Unpin a match: pass its `pages` (or just its last page id)."""
        self._native.unpin(pages)

    def insert(self, tokens: ArrayLike, pages: ArrayLike, now: Optional[float] = None) -> int:
        """Cache the full pages of a sequence (e.g. `tree.tokens(n), tree.pages(n)`).
        Returns the number of pages newly cached (each gains one reference)."""
        return self._native.insert(tokens, pages, now)

    def evict(self, num_pages: int) -> int:
        """Evict LRU unpinned entries until `num_pages` pages were freed (or no
        candidate is left); entries whose page a live sequence still holds are
        skipped. Returns the pages freed."""
        return self._native.evict(num_pages)

    def evict_expired(self, now: float, ttl: float) -> int:
        """Evict unpinned entries not used since `now - ttl`; returns entries evicted."""
        return self._native.evict_expired(now, ttl)

    def clear(self) -> int:
        """Evict every unpinned entry; returns entries evicted."""
        return self._native.clear()

    def stats(self) -> dict:
        """queries, hits, hit_rate, tokens_queried, tokens_saved, token_hit_rate,
        inserted_pages, evictions, pages_freed, entries, pinned."""
        return self._native.stats()

    def reset_stats(self) -> None:
        self._native.reset_stats()

    @property
    def num_entries(self) -> int:
        return self._native.num_entries

    @property
    def num_pinned(self) -> int:
        return self._native.num_pinned

    def check_invariants(self) -> None:
        check_invariants(self.pool)


class Scheduler:
    """Runnable leaves ordered by priority (higher first, FIFO among equals).

    Each step gets at most `token_budget` tokens; a leaf with P pending prompt
    tokens gets `min(P, remaining budget, chunk_size)`, a decoding leaf (P = 0)
    one. `tree` is only needed for `preempt_candidates`.
    """

    __slots__ = ("_native",)

    def __init__(self, token_budget: int, chunk_size: int = 512, max_batch: int = 0,
                 tree: Optional[KVTree] = None) -> None:
        token_budget = _int_arg("Scheduler", "token_budget", token_budget, 1, 2**63 - 1)
        chunk_size = _int_arg("Scheduler", "chunk_size", chunk_size, 1, 2**63 - 1)
        max_batch = _int_arg("Scheduler", "max_batch", max_batch, 0, 2**63 - 1)
        self._native = _native.Scheduler(token_budget, chunk_size, max_batch,
                                         tree._native if tree is not None else None)

    def add(self, leaf: int, priority: float = 0.0, pending_tokens: int = 0) -> None:
        self._native.add(leaf, priority, pending_tokens)

    def remove(self, leaf: int) -> None:
        self._native.remove(leaf)

    def set_priority(self, leaf: int, priority: float) -> None:
        """Change priority; the leaf keeps its FIFO position among equals."""
        self._native.set_priority(leaf, priority)

    def set_pending(self, leaf: int, pending_tokens: int) -> None:
        self._native.set_pending(leaf, pending_tokens)

    def pending(self, leaf: int) -> int:
        return self._native.pending(leaf)

    def __contains__(self, leaf: int) -> bool:
        return leaf in self._native

    def __len__(self) -> int:
        return len(self._native)

    @property
    def token_budget(self) -> int:
        return self._native.token_budget

    @token_budget.setter
    def token_budget(self, value: int) -> None:
        self._native.token_budget = value

    @property
    def chunk_size(self) -> int:
        return self._native.chunk_size

    def schedule(self, leaves: Optional[ArrayLike] = None,
                 pending: Optional[ArrayLike] = None) -> tuple[I64, I32]:
        """This step's plan `(leaves int64 [B], num_new_tokens int32 [B])`.

        Without arguments: over all registered leaves and their stored pending
        counts. With `leaves` and `pending`: over those registered leaves only,
        using the given pending counts. Does not change state; see `advance`.
        """
        if leaves is None:
            return self._native.schedule()
        return self._native.schedule(leaves, pending)

    def advance(self, leaves: ArrayLike, counts: ArrayLike) -> None:
        """Record that `counts[i]` pending tokens of `leaves[i]` were processed."""
        self._native.advance(leaves, counts)

    def preempt_order(self, leaves: ArrayLike) -> I64:
        """Indices into `leaves` in preemption order (lowest priority, newest first)."""
        return self._native.preempt_order(leaves)

    def preempt_candidates(self, pages_needed: int) -> I64:
        """Lowest-priority leaves whose release frees >= `pages_needed` pages
        (all registered leaves if that is never reached)."""
        return self._native.preempt_candidates(pages_needed)


def check_invariants(pool: BlockPool, trees: Optional[Iterable[KVTree]] = None,
                     caches: Optional[Iterable[RadixCache]] = None,
                     extra_refs: Optional[ArrayLike] = None) -> None:
    """Raise `InvariantError` unless the pool and its users are consistent.

    Checked (independently of the native bookkeeping, from its raw arrays):
    every page's refcount equals the references held by tree nodes plus cache
    entries; the free list holds exactly the zero-ref pages, once each; `used`
    matches; parent links have no cycles; every live node's pages are valid
    allocated pages; with no live node and no cache entry, zero pages are used.
    Plus each structure's native `validate()`. By default `trees`/`caches` are
    all live ones created on `pool`; `extra_refs` lists page ids referenced
    directly by the caller (one reference per occurrence). O(pages + nodes);
    meant for tests.
    """
    users = list(pool._users)
    trees = [u for u in users if isinstance(u, KVTree)] if trees is None else list(trees)
    caches = [u for u in users if isinstance(u, RadixCache)] if caches is None else list(caches)
    problems: list[str] = []
    rc = pool.debug_refcounts().astype(np.int64)
    refs = np.zeros_like(rc)
    if extra_refs is not None:
        np.add.at(refs, np.asarray(extra_refs, dtype=np.int64), 1)
    for t in trees:
        problems += t._native.validate()
        refs += t._native.debug_page_refs()
    for c in caches:
        problems += c._native.validate()
        refs += c._native.debug_page_refs()

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
    if (all(t.num_live_nodes == 0 for t in trees) and all(c.num_entries == 0 for c in caches)
            and extra_refs is None and pool.used != 0
            and len(pool._users) == len(trees) + len(caches)):
        problems.append(f"nothing holds pages but {pool.used} pages are used")
    if problems:
        raise InvariantError("\n".join(problems))


def _check_tree_structure(tree: KVTree, rc: NDArray[np.int64]) -> list[str]:
    """No cycles (pointer doubling over parent links) and valid pages."""
    problems: list[str] = []
    handles = tree._native.debug_live_nodes()
    parents = tree._native.debug_parents()
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
    _, indices, _ = tree._native.export_csr(handles)
    if len(indices) and ((indices < 0).any() or (indices >= len(rc)).any()):
        problems.append("a live node references an out-of-range page")
    elif len(indices) and (rc[indices] <= 0).any():
        problems.append("a live node references a free page")
    return problems
