"""Dendrite native core: the paged KV cache bookkeeping (BlockPool, KVTree, RadixCache,
Scheduler) and host-side helpers. Import it as dendrite.kv, which documents the
refcount scheme and the argument rules; dendrite/_native.pyi has the types."""

# Type stub of the pybind11 module built from native/bindings.cpp. The
# docstrings are those of the bindings, word for word, and every name and
# argument name matches the module: tests/native/test_native_stub.py checks
# both, so edit the two together.
#
# Array arguments are `ArrayLike`: any integer dtype, or a sequence numpy
# turns into one, range-checked when narrowed (see dendrite.kv). Scalar
# integers are `SupportsIndex`: ints and numpy integers.

from collections.abc import Iterator, Sequence
from typing import SupportsIndex, TypedDict, overload

import numpy as np
from numpy.typing import ArrayLike, NDArray

_I32 = NDArray[np.int32]
_I64 = NDArray[np.int64]

class OutOfPages(RuntimeError):
    """The pool cannot satisfy an allocation; nothing was changed (all-or-nothing), so the
    caller may evict or preempt and retry. Subclass of RuntimeError."""

class FrozenNode(ValueError):
    """Appending to / truncating a node that has children: its pages are shared read-only.
    Fork it once more to continue it. Subclass of ValueError."""

class ArgumentRangeError(ValueError, IndexError):
    """An integer argument out of its range (page id >= num_pages, negative token id or
    count, a value past int32), raised before anything changed. Subclass of ValueError
    and IndexError."""

class BlockPool:
    """Fixed set of `num_pages` KV pages of `page_size` tokens, refcounted.

    Page ids are int32 in [0, num_pages); the slot of offset `o` in page `p` is
    `p * page_size + o`. `cow_headroom` pages are reserved for copy-on-write copies so
    forked children can always make their first write.

    `num_pages` >= 1 and `page_size` >= 1 with `num_pages * page_size` < 2**31 (slots are
    int32), `cow_headroom` in [0, num_pages]; all ints, not bool (TypeError otherwise,
    ValueError when out of range, each naming the argument)."""

    def __init__(self, num_pages: SupportsIndex, page_size: SupportsIndex = 16,
                 cow_headroom: SupportsIndex = 0) -> None: ...
    @property
    def num_pages(self) -> int:
        """Pages in the pool."""
    @property
    def page_size(self) -> int:
        """Tokens per page."""
    @property
    def cow_headroom(self) -> int:
        """Pages only copy-on-write allocations may take."""
    @property
    def used(self) -> int:
        """Pages with a nonzero refcount."""
    @property
    def free(self) -> int:
        """Pages on the free list (headroom included)."""
    @property
    def high_watermark(self) -> int:
        """Most pages ever used at once (since construction or the last reset)."""
    def reset_high_watermark(self) -> None:
        """Restart `high_watermark` from the pages used now."""
    def can_allocate(self, n: SupportsIndex, cow: SupportsIndex = 0) -> bool:
        """Whether `n` ordinary plus `cow` copy-on-write pages fit right now."""
    def allocate(self) -> int:
        """One page with refcount 1. Raises OutOfPages (pool unchanged)."""
    def allocate_batch(self, n: SupportsIndex, for_cow: bool = False) -> _I32:
        """`n` pages (int32 [n]) with refcount 1, all or nothing. `for_cow` may use the headroom."""
    def incref(self, page: SupportsIndex) -> None:
        """Add one reference to an allocated page."""
    def decref(self, page: SupportsIndex) -> bool:
        """Drop one reference; True when the page went back to the free list."""
    def decref_batch(self, pages: ArrayLike) -> None:
        """Drop one reference per occurrence of each page, all or nothing (a page listed k times
        needs k references)."""
    def refcount(self, page: SupportsIndex) -> int:
        """References held on `page` (0: free)."""
    def debug_refcounts(self) -> _I32:
        """Copy of every page's refcount (int32 [num_pages])."""
    def debug_free_list(self) -> _I32:
        """Copy of the free list (int32, top of the stack last)."""
    def debug_trees(self) -> list[KVTree]:
        """The live KVTrees built on this pool, oldest first (for check_invariants)."""
    def debug_caches(self) -> list[RadixCache]:
        """The live RadixCaches built on this pool, oldest first (for check_invariants)."""
    def __repr__(self) -> str: ...

class AppendResult:
    """Result of `KVTree.append`/`append_batch`: `slot_mapping` int32 [T] (where each new
    token's K/V goes: page * page_size + offset) and `copies` int32 [m, 3] rows
    (src_page, dst_page, num_tokens) to execute on the device *before* writing this
    step's K/V. Unpacks as `slots, copies = result`."""

    @property
    def slot_mapping(self) -> _I32:
        """int32 [T]: the slot of each appended token, in order."""
    @property
    def copies(self) -> _I32:
        """int32 [m, 3]: copy-on-write rows (src_page, dst_page, num_tokens)."""
    def __iter__(self) -> Iterator[_I32]:
        """Yields `slot_mapping`, then `copies`."""
    def __len__(self) -> int:
        """2: it unpacks as a pair."""
    def __repr__(self) -> str: ...

class KVTree:
    """Token sequences as a tree over a `BlockPool`, with O(1) copy-on-write fork.

    A node is a segment of tokens after its parent's; it owns only the pages its segment
    wrote. `fork` creates children that read the parent's pages without touching any
    refcount. A node with children is frozen (`append` raises `FrozenNode`): continue it
    by forking it once more. A child's first write into the parent's partly filled last
    page allocates a private page and returns a copy instruction; the parent's slots are
    never written. Node handles are ints; the tree keeps its pool alive."""

    def __init__(self, pool: BlockPool) -> None: ...
    @property
    def pool(self) -> BlockPool:
        """The pool this tree takes pages from."""
    @property
    def num_live_nodes(self) -> int:
        """Live nodes (released interior nodes included)."""
    def new_sequence(self) -> int:
        """An empty root sequence."""
    def new_sequence_from_prefix(self, pages: ArrayLike, num_tokens: SupportsIndex,
                                 tokens: ArrayLike) -> int:
        """A root whose first `num_tokens` tokens (`tokens`) are already in `pages`.

        Typically a `RadixCache.match_prefix` hit. Increfs the pages (the node owns those
        references); `len(pages)` must be `ceil(num_tokens / page_size)`."""
    def fork(self, node: SupportsIndex, n: SupportsIndex = 1) -> list[int]:
        """`n` children of `node`, O(1) each; no page refcount changes. Freezes `node`.

        All or nothing: `n` < 0, or more than the node handles left (2**31 - 1 per tree),
        raises ValueError before any child exists."""
    def fork_one(self, node: SupportsIndex) -> int:
        """`fork(node, 1)[0]` without building a list."""
    def append(self, node: SupportsIndex, tokens: ArrayLike) -> AppendResult:
        """Append tokens (ids in [0, 2**31 - 1]) to leaf `node`: slot mapping + copy-on-write
        copies. All or nothing: on `OutOfPages`, or a bad argument, nothing changed."""
    def append_batch(self, nodes: ArrayLike, counts: ArrayLike,
                     tokens: ArrayLike) -> AppendResult:
        """Append `counts[b]` tokens (consecutive in `tokens`) to each distinct leaf
        `nodes[b]`; slot_mapping follows `tokens`. All or nothing over the batch.

        `len(nodes) == len(counts)`, counts >= 0 summing to `len(tokens)`, token ids in
        [0, 2**31 - 1]."""
    def truncate(self, node: SupportsIndex, num_tokens: SupportsIndex) -> None:
        """Drop `num_tokens` tokens from the end of leaf `node`'s own segment (rollback)."""
    def set_last_tokens(self, nodes: ArrayLike, tokens: ArrayLike) -> None:
        """Set the id of each leaf's last own token (placeholders appended by a step launched
        before the previous step's tokens were read). All or nothing."""
    def release(self, node: SupportsIndex) -> None:
        """Drop the caller's handle. The node is freed once it has no children, and so are
        ancestors left without children and without a handle."""
    def release_subtree(self, node: SupportsIndex) -> None:
        """Free `node` and all its descendants (their handles become invalid)."""
    def is_valid(self, node: SupportsIndex) -> bool:
        """Whether `node` is a live handle (released interior nodes are live)."""
    def is_released(self, node: SupportsIndex) -> bool:
        """Live, but the caller's handle was released (kept alive by children)."""
    def num_tokens(self, node: SupportsIndex) -> int:
        """Tokens of the whole path from the root."""
    def num_pages(self, node: SupportsIndex) -> int:
        """Pages of the whole path: ceil(num_tokens / page_size)."""
    def pages_freed_by_release(self, node: SupportsIndex) -> int:
        """Pages `release(node)` would give back to the pool right now."""
    def pages_needed(self, nodes: ArrayLike, counts: ArrayLike) -> int:
        """Pages `append_batch(nodes, counts, ...)` would allocate (copies included)."""
    def parent(self, node: SupportsIndex) -> int:
        """Parent handle, -1 for a root."""
    def children(self, node: SupportsIndex) -> list[int]:
        """Handles of `node`'s children, oldest first."""
    def num_children(self, node: SupportsIndex) -> int:
        """Children of `node`."""
    def depth(self, node: SupportsIndex) -> int:
        """Ancestors of `node` (0 for a root)."""
    def tokens(self, node: SupportsIndex) -> _I32:
        """All token ids of the path from the root (int32 [num_tokens])."""
    def pages(self, node: SupportsIndex) -> _I32:
        """All page ids of the path from the root (int32 [num_pages])."""
    def export_csr(self, leaves: ArrayLike) -> tuple[_I32, _I32, _I32]:
        """FlashInfer paged-KV layout for `leaves` (any live nodes): `(kv_indptr [B+1],
        kv_indices [nnz], kv_last_page_len [B])`, int32, built by memcpy of cached
        flattened page lists."""
    def debug_page_refs(self) -> _I32:
        """Per page, the references live nodes hold (int32 [num_pages of the pool])."""
    def debug_live_nodes(self) -> _I64:
        """Handles of all live nodes (int64)."""
    def debug_parents(self) -> _I64:
        """Parent handle of each `debug_live_nodes()` entry, -1 for roots (int64)."""
    def validate(self) -> list[str]:
        """Structural problems the tree finds in itself (empty when consistent)."""

class _RadixStats(TypedDict):
    queries: int
    hits: int
    hit_rate: float
    tokens_queried: int
    tokens_saved: int
    token_hit_rate: float
    inserted_pages: int
    evictions: int
    pages_freed: int
    entries: int
    pinned: int

class RadixCache:
    """Page-granular prefix cache over token ids sharing the pool's refcounts.

    Each entry is one full page (page_size token ids) holding one reference.
    `match_prefix` pins the match until `unpin`; eviction takes unpinned leaves in LRU
    order. Times default to the monotonic clock (`time.monotonic()`), or pass `now`
    explicitly. The cache keeps its pool alive."""

    def __init__(self, pool: BlockPool) -> None: ...
    @property
    def pool(self) -> BlockPool:
        """The pool whose pages are cached."""
    @property
    def num_entries(self) -> int:
        """Cached pages (one entry each)."""
    @property
    def num_pinned(self) -> int:
        """Entries pinned by a `match_prefix` not yet unpinned."""
    @property
    def num_evictable(self) -> int:
        """Unpinned leaf entries, the candidates of the next eviction."""
    def match_prefix(self, tokens: ArrayLike, now: float | None = None,
                     pin: bool = True) -> tuple[int, _I32]:
        """Longest cached page-aligned prefix: `(num_tokens, pages int32)`. Pinned (when
        `pin` and non-empty) until `unpin(pages)`."""
    @overload
    def unpin(self, last_page: SupportsIndex) -> None:
        """Unpin a match by its last page id."""
    @overload
    def unpin(self, pages: ArrayLike) -> None:
        """Unpin a match: pass its `pages` (empty: nothing to unpin)."""
    def insert(self, tokens: ArrayLike, pages: ArrayLike, now: float | None = None) -> int:
        """Cache the full pages of a sequence (e.g. `tree.tokens(n), tree.pages(n)`).
        Returns the number of pages newly cached (each gains one reference)."""
    def evict(self, num_pages: SupportsIndex) -> int:
        """Evict LRU unpinned entries until `num_pages` pages were freed (or no candidate is
        left); entries whose page a live sequence still holds are skipped. Returns the
        pages freed."""
    def evict_expired(self, now: float, ttl: float) -> int:
        """Evict unpinned entries not used since `now - ttl`; returns entries evicted."""
    def clear(self) -> int:
        """Evict every unpinned entry; returns entries evicted."""
    def reset_stats(self) -> None:
        """Zero the counters of `stats()`."""
    def stats(self) -> _RadixStats:
        """queries, hits, hit_rate, tokens_queried, tokens_saved, token_hit_rate,
        inserted_pages, evictions, pages_freed, entries, pinned."""
    def debug_page_refs(self) -> _I32:
        """Per page, the references cache entries hold (int32 [num_pages of the pool])."""
    def validate(self) -> list[str]:
        """Structural problems the cache finds in itself (empty when consistent)."""

class Scheduler:
    """Runnable leaves ordered by priority (higher first, FIFO among equals).

    Each step gets at most `token_budget` tokens; a leaf with P pending prompt tokens
    gets `min(P, remaining budget, chunk_size)`, a decoding leaf (P = 0) one; at most
    `max_batch` leaves (0: no limit). `tree` is only needed for `preempt_candidates`.
    `token_budget` and `chunk_size` >= 1, `max_batch` >= 0, all ints, not bool."""

    def __init__(self, token_budget: SupportsIndex, chunk_size: SupportsIndex = 512,
                 max_batch: SupportsIndex = 0, tree: KVTree | None = None) -> None: ...
    def add(self, leaf: SupportsIndex, priority: float = 0.0,
            pending_tokens: SupportsIndex = 0) -> None:
        """Register a runnable leaf with `pending_tokens` prompt tokens still to prefill."""
    def remove(self, leaf: SupportsIndex) -> None:
        """Unregister a leaf."""
    def set_priority(self, leaf: SupportsIndex, priority: float) -> None:
        """Change priority; the leaf keeps its FIFO position among equals."""
    def set_pending(self, leaf: SupportsIndex, pending_tokens: SupportsIndex) -> None:
        """Set the prompt tokens a leaf still has to prefill."""
    def pending(self, leaf: SupportsIndex) -> int:
        """Prompt tokens the leaf still has to prefill."""
    def __contains__(self, leaf: SupportsIndex) -> bool:
        """Whether `leaf` is registered."""
    def __len__(self) -> int:
        """Registered leaves."""
    @property
    def token_budget(self) -> int:
        """Most tokens one step plans (settable, >= 1)."""
    @token_budget.setter
    def token_budget(self, value: SupportsIndex) -> None: ...
    @property
    def chunk_size(self) -> int:
        """Most prompt tokens of one leaf per step."""
    @overload
    def schedule(self) -> tuple[_I64, _I32]:
        """This step's plan `(leaves int64 [B], num_new_tokens int32 [B])` over all
        registered leaves and their stored pending counts. Does not change state; see
        `advance`."""
    @overload
    def schedule(self, leaves: ArrayLike, pending: ArrayLike) -> tuple[_I64, _I32]:
        """This step's plan over the given registered `leaves` only, using the given
        `pending` counts (0: decode, one token). Does not change state."""
    def preempt_order(self, leaves: ArrayLike) -> _I64:
        """Indices into `leaves` (int64) in preemption order: lowest priority first, newest
        first among equals."""
    def advance(self, leaves: ArrayLike, counts: ArrayLike) -> None:
        """Record that `counts[i]` pending tokens of `leaves[i]` were processed."""
    def preempt_candidates(self, pages_needed: SupportsIndex) -> _I64:
        """Lowest-priority leaves (int64) whose release frees >= `pages_needed` pages (all
        registered leaves if that is never reached). Needs `tree`."""

def check_invariants(pool: BlockPool, trees: Sequence[KVTree],
                     caches: Sequence[RadixCache]) -> list[str]:
    """Native cross-check of refcounts, free list and each structure's validate(): the
    problems found (empty when consistent). dendrite.kv.check_invariants is the full
    check, recomputed in Python from the raw arrays."""

class _FuzzStats(TypedDict):
    ops: int
    forks: int
    appends: int
    batch_appends: int
    truncates: int
    releases: int
    subtree_releases: int
    matches: int
    match_hits: int
    inserts: int
    evicted_pages: int
    out_of_pages: int
    frozen_errors: int
    cow_copies: int
    checks: int
    max_live_nodes: int

def run_fuzz(seed: SupportsIndex, num_ops: SupportsIndex, num_pages: SupportsIndex = 96,
             page_size: SupportsIndex = 4, check_every: SupportsIndex = 64) -> _FuzzStats:
    """Random ops over pool/tree/cache with invariant and simulated-KV checks (test helper)."""

def shared_prefix_pages(indptr: ArrayLike, indices: ArrayLike) -> int:
    """Longest common full-page prefix of the CSR rows (each row keeps its last page)."""

def plan_tree_attention(indptr: ArrayLike, last_page_len: ArrayLike, shared_pages: SupportsIndex,
                        page_size: SupportsIndex, leaves_per_tile: SupportsIndex,
                        target_items: SupportsIndex, max_splits: SupportsIndex,
                        max_items: SupportsIndex, block_n: SupportsIndex, items_out: _I32,
                        splits_out: _I32) -> tuple[int, int]:
    """Tree-attention work list into items_out (6 int32 per item) and splits_out; returns
    (num_items, tokens_per_item). See dendrite/kernels/tree_attention.py."""

def bench_fork_ns(tree: KVTree, node: SupportsIndex, iters: SupportsIndex = 10000,
                  rounds: SupportsIndex = 5) -> float:
    """Median ns per single-child fork of node, timed in C++ with steady_clock."""
