"""CUDA graphs for decode steps: one captured forward per batch-size bucket.

A decode step of a small model is hundreds of tiny kernels; launched from
Python each costs more than it computes. Here the whole step -- embedding,
every layer (K/V write + FlashInfer decode attention), final norm, logits of
the B rows and the greedy argmax -- is captured once per bucket
(1, 2, 4, 8, ... up to `max_batch_size`) and replayed.

What changes between replays lives in fixed-address buffers:

* token ids, positions and slot mapping: copied into static device buffers;
* the page tables: a FlashInfer decode wrapper in CUDA-graph mode per bucket
  (`GraphDecodeWrapper`), planned *outside* the graph before each replay,
  which rewrites its fixed indptr / indices / last_page_len buffers and its
  schedule in the int workspace.

Steps whose rows share a long page prefix (leaves forked off one context)
replay a second graph per bucket, captured on first use, whose attention is
two-level cascade (`GraphCascadeWrapper`: the shared pages read once for all
rows, each row's own pages, merged); `GRAPH_CASCADE_RULE` picks it per step.

A batch of B < bucket rows is padded: the padding rows attend over a single
reserved "pad page" and write their K/V into it, so they never touch a real
sequence's KV. That page must never be handed out by the page allocator
(default: the pool's last page -- give the allocator `num_pages - 1`).

`compile=True` additionally runs the captured forward through
`torch.compile` first, so the elementwise tails (RMSNorm, RoPE, SiLU*up,
residual adds) fuse into a few Triton kernels instead of ~40 launches per
layer; the K/V write and the FlashInfer call are opaque custom ops over the
whole pool (see `_ops`). It costs a compile per bucket and is opt-in.

Outputs (`logits` [B, V] float32 and greedy `tokens` [B] int64) are views of
static buffers: the next `run()` overwrites them, so consume or copy first.
No host sync happens in `run()` except the backend's `PlanFence` when a
bucket's wrapper is re-planned: it keeps FlashInfer's pinned planning buffer
from being rewritten while the previous plan's copy out of it is still queued.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from dendrite.attention.base import AttentionMetadata
from dendrite.attention.cascade import CascadeRule, shared_prefix_pages, split_levels
from dendrite.attention.flashinfer_backend import (
    FlashInferBackend,
    GraphCascadeWrapper,
    GraphDecodeWrapper,
)
from dendrite.kernels import tree_attention
from dendrite.kernels.tree_attention import TreeAttention
from dendrite.model.kv_cache import KVCache

__all__ = ["CudaGraphDecodeRunner", "DEFAULT_BUCKETS", "GRAPH_CASCADE_RULE", "GRAPH_TREE_RULE",
           "bucket_for", "greedy_tokens", "scatter_rows", "tree_attention_supported"]

log = logging.getLogger(__name__)

DEFAULT_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)

#: When a replayed decode step runs as cascade (see `GraphCascadeWrapper`).
#: From the attention-only grid replayed from CUDA graphs (H100, Llama-3.2-1B
#: attention shape, docs/benchmarks.md, "GPU only" column): cascade won at
#: 4 rows x 16K shared (1.4-1.5x), 16 x 4K (1.7-2.2x), 64 x 1K (1.4-1.6x) and
#: every larger point, and lost at 4 x 4K (0.7x), 16 x 1K (0.8-1.0x) and
#: below: it pays off once about 32K redundant prefix-token reads per layer
#: are saved ((rows - 1) x shared), which separates every measured point.
GRAPH_CASCADE_RULE = CascadeRule(min_batch=4, min_shared=1024, min_saved_tokens=32768,
                                 min_shared_ratio=1.0)

#: When a replayed decode step runs through `TreeAttention` (see
#: `tree_attention_supported`): whenever its rows share a page. Per layer
#: (H100, Llama-3.2-1B attention shape, `bench_kernels_gpu.py --sections
#: tree`, docs/benchmarks.md) it beat FlashInfer's flat decode at every
#: shared point measured, from 2 rows x 4K shared tokens (10.2 vs 15.4 us)
#: and 16 x 256 (7.2 vs 12.6 us) up to 32 x 4K (16.9 vs 113.5 us), and
#: matched it on one unshared 4K row (10.8 vs 10.4 us).
GRAPH_TREE_RULE = CascadeRule(min_batch=2, min_shared=16, min_saved_tokens=0,
                              min_shared_ratio=0.0)


def tree_attention_supported(backend: FlashInferBackend, kv_cache: KVCache) -> bool:
    """Whether cascade graphs can use `TreeAttention` for this backend and cache."""
    return (not any(w is not None for w in (backend.sliding_windows or []))
            and tree_attention.supported(backend.num_heads, backend.num_kv_heads,
                                         backend.head_dim, kv_cache.dtype, kv_cache.device))


#: GraphDecodeWrapper by id, for the custom ops the compiler sees (ops take no objects).
_WRAPPERS: dict[int, GraphDecodeWrapper] = {}
_OPS: dict[str, Any] = {}


def _ops() -> dict[str, Any]:
    """Two custom ops, opaque to torch.compile, registered once.

    `dendrite::kv_write(kv, rows, values)` scatters K and V rows into the
    whole pool `kv` (viewed as [L * 2 * num_pages * page_size, Hkv, D]) in one
    kernel, mutating it in place; `dendrite::graph_decode_attention(q, kv,
    layer, wrapper_id)` reads it. Both take the pool itself, not per-layer
    views: a graph input written through a view makes the compiler
    materialize (copy) the whole layer cache every step, while a graph input
    mutated by an op is updated in place, and the data dependency through
    `kv` keeps the write before the read.
    """
    if not _OPS:
        @torch.library.custom_op("dendrite::kv_write", mutates_args=("kv",))
        def kv_write(kv: torch.Tensor, rows: torch.Tensor, values: torch.Tensor) -> None:
            scatter_rows(kv.view(-1, kv.shape[-2] * kv.shape[-1]), rows,
                         values.reshape(values.shape[0], -1))

        @kv_write.register_fake
        def _(kv, rows, values):
            return None

        @torch.library.custom_op("dendrite::graph_decode_attention", mutates_args=())
        def attention(q: torch.Tensor, kv: torch.Tensor, layer: int,
                      wrapper_id: int) -> torch.Tensor:
            return _WRAPPERS[wrapper_id].run(q, kv[layer, 0], kv[layer, 1])

        @attention.register_fake
        def _(q, kv, layer, wrapper_id):
            return torch.empty_like(q)

        _OPS.update(kv_write=kv_write, attention=attention)
    return _OPS


_ROWS_KERNEL: Any = None


def _rows_kernel() -> Any:
    """Triton kernel: dst[rows[i], :] = src[i, :], one program per row."""
    global _ROWS_KERNEL
    if _ROWS_KERNEL is None:
        import triton
        import triton.language as tl

        @triton.jit
        def kernel(dst, rows, src, n: tl.constexpr, block: tl.constexpr):
            i = tl.program_id(0)
            r = tl.load(rows + i).to(tl.int64)  # pools can exceed 2**31 elements
            offs = tl.arange(0, block)
            m = offs < n
            x = tl.load(src + i.to(tl.int64) * n + offs, mask=m)
            tl.store(dst + r * n + offs, x, mask=m)

        _ROWS_KERNEL = kernel
    return _ROWS_KERNEL


def scatter_rows(dst: torch.Tensor, rows: torch.Tensor, src: torch.Tensor) -> None:
    """`dst[rows] = src` for 2-D `dst` [R, n] and `src` [len(rows), n].

    One small Triton launch on CUDA (PyTorch's generic `index_put_` kernel
    takes ~3 us for a few KV rows, a tenth of a decode layer's budget);
    `index_put_` elsewhere.
    """
    if dst.is_cuda and dst.is_contiguous() and rows.numel():
        try:
            kernel = _rows_kernel()
        except ImportError:
            kernel = None
        if kernel is not None:
            n = dst.shape[1]
            kernel[(rows.numel(),)](dst, rows, src.contiguous(), n=n,
                                    block=max(16, 1 << (n - 1).bit_length()))
            return
    dst.index_put_((rows,), src)


def _rows(t: torch.Tensor | None, b: int) -> torch.Tensor | None:
    return None if t is None else t[:b]


def greedy_tokens(logits: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """`logits.argmax(-1)` in two passes: per-chunk maxima, then the best chunk.

    A single argmax over a 128K vocabulary is one long serial reduction per
    row (~25 us at batch 1); split in chunks it spreads over the SMs. Ties
    resolve to the lowest index, as `argmax` does.
    """
    b, v = logits.shape
    n = -(-v // chunk)
    if n * chunk != v:
        logits = torch.nn.functional.pad(logits, (0, n * chunk - v), value=float("-inf"))
    vals, idx = logits.view(b, n, chunk).max(dim=-1)
    best = vals.argmax(dim=-1, keepdim=True)
    return (best * chunk + idx.gather(-1, best)).squeeze(-1)


class _OpaqueKV:
    """KVCache look-alike for compiled capture: `write` goes through the custom op.

    K and V of a step become one scatter: rows `(2 * layer + {0, 1}) *
    slots_per_layer + slot` of the flattened pool, values `cat(k, v)` (the
    compiler fuses the concatenation into the kernels producing k and v).
    """

    def __init__(self, kv_cache: KVCache) -> None:
        self.kv = kv_cache.kv
        self.num_kv_heads, self.head_dim = kv_cache.num_kv_heads, kv_cache.head_dim
        self._slots = kv_cache.num_pages * kv_cache.page_size
        self._write = _ops()["kv_write"]

    def layer(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.kv[layer, 0], self.kv[layer, 1]

    def write(self, layer: int, slot_mapping: torch.Tensor, k: torch.Tensor,
              v: torch.Tensor) -> None:
        base = 2 * layer * self._slots
        rows = torch.cat([slot_mapping + base, slot_mapping + (base + self._slots)])
        self._write(self.kv, rows, torch.cat([k, v]))


def bucket_for(batch_size: int, buckets: Sequence[int]) -> int | None:
    """Smallest bucket >= batch_size (buckets sorted ascending), None if too big."""
    for b in buckets:
        if b >= batch_size:
            return b
    return None


class _GraphAttention:
    """The backend the model sees while a bucket is captured.

    `plan()` is a no-op (the runner plans the bucket's wrapper before each
    replay); `forward()` runs that wrapper, so the captured kernels read the
    wrapper's fixed buffers.
    """

    def __init__(self, gw: GraphDecodeWrapper, kv: torch.Tensor | None = None) -> None:
        self.gw = gw
        self.kv = kv  # set: go through the custom op over the whole pool (compiled capture)
        self.wrapper_id = id(gw)
        if kv is not None:
            _WRAPPERS[self.wrapper_id] = gw
            self.op = _ops()["attention"]

    def plan(self, meta: AttentionMetadata) -> None:  # planned outside the graph
        return None

    def forward(self, layer: int, q: torch.Tensor, k_cache: torch.Tensor,
                v_cache: torch.Tensor) -> torch.Tensor:
        if self.kv is not None:
            return self.op(q, self.kv, layer, self.wrapper_id)
        return self.gw.run(q, k_cache, v_cache)


class _GraphCascadeAttention(_GraphAttention):
    """The backend the model sees while a bucket's cascade graph is captured
    (FlashInfer's two levels, or Dendrite's `TreeAttention`)."""

    def __init__(self, cw: GraphCascadeWrapper | TreeAttention) -> None:
        self.cw = cw
        self.kv = None

    def forward(self, layer: int, q: torch.Tensor, k_cache: torch.Tensor,
                v_cache: torch.Tensor) -> torch.Tensor:
        return self.cw.run(q, k_cache, v_cache)


@dataclass
class _Bucket:
    size: int
    gw: GraphDecodeWrapper | GraphCascadeWrapper | TreeAttention
    graph: torch.cuda.CUDAGraph
    logits: torch.Tensor  # float32 [size, V]
    tokens: torch.Tensor  # int64 [size]


class CudaGraphDecodeRunner:
    """Replays captured decode steps; falls back to nothing (see `can_run`).

    Args:
        model: a `LlamaForCausalLM` (`forward(ids, meta, kv, backend)`,
            `compute_logits(hidden)`).
        kv_cache: the device KV pool the model writes into.
        backend: the FlashInfer backend of the eager path (shapes, dtype,
            workspace are shared with it).
        max_batch_size: largest bucket captured.
        buckets: candidate bucket sizes (default powers of two).
        pad_page: page reserved for padding rows (default: the last page).
        max_pages: capacity of each bucket's page-index buffer (total pages
            over the batch, shared pages counted per sequence); default
            enough for every row to span `max_seq_len` tokens.
        max_seq_len: default `min(model max positions, pool size)`.
        compile: fuse the forward with `torch.compile` before capturing;
            a string is taken as the compile mode (e.g.
            "max-autotune-no-cudagraphs"; never a CUDA-graph mode: the
            runner captures the graphs itself).
        skip_redundant_plans: reuse FlashInfer's decode schedule while no
            row's page count changed (see `GraphDecodeWrapper`).
        cascade: "auto" (a step whose rows share a long page prefix replays
            a cascade graph when `cascade_rule` says so), "always" (whenever
            rows share a page), "never". Not with `compile`.
        cascade_rule: `(rows, shared_tokens, own_tokens) -> bool`, default
            `GRAPH_TREE_RULE` with `tree_attention`, else `GRAPH_CASCADE_RULE`.
        tree_attention: cascade graphs run Dendrite's `TreeAttention`
            kernels (the shared pages and every row's own pages in one
            split-KV pass plus a merge) instead of FlashInfer's two levels;
            default: where `tree_attention.supported`.
    """

    def __init__(self, model: Any, kv_cache: KVCache, backend: FlashInferBackend, *,
                 max_batch_size: int = 64, buckets: Sequence[int] = DEFAULT_BUCKETS,
                 pad_page: int | None = None, max_pages: int | None = None,
                 max_seq_len: int | None = None, compile: bool | str = False,
                 skip_redundant_plans: bool = True, cascade: str = "auto",
                 cascade_rule: Any = None, greedy: bool = True,
                 tree_attention: bool | None = None) -> None:
        if kv_cache.device.type != "cuda":
            raise ValueError("CUDA graphs need a CUDA KV cache")
        self.model, self.kv, self.backend = model, kv_cache, backend
        self.device = kv_cache.device
        self.page_size = kv_cache.page_size
        self.pad_page = kv_cache.num_pages - 1 if pad_page is None else int(pad_page)
        self.pad_slot = self.pad_page * self.page_size
        sizes = sorted({int(b) for b in buckets if int(b) <= max_batch_size} | {max_batch_size})
        self.buckets = tuple(sizes)
        self.max_batch_size = max_batch_size
        cfg = model.config
        if max_seq_len is None:
            max_seq_len = min(cfg.max_position_embeddings, kv_cache.num_pages * self.page_size)
        pages_per_seq = -(-max_seq_len // self.page_size)
        self.max_pages = max_pages or max_batch_size * pages_per_seq + max_batch_size
        # Static inputs shared by all buckets (a bucket uses the first rows).
        self.input_ids = torch.zeros(max_batch_size, dtype=torch.int64, device=self.device)
        self.positions = torch.zeros(max_batch_size, dtype=torch.int64, device=self.device)
        self.slot_mapping = torch.full((max_batch_size,), self.pad_slot, dtype=torch.int64,
                                       device=self.device)
        self.qo_indptr = torch.arange(max_batch_size + 1, dtype=torch.int32, device=self.device)
        self.kv_lens = torch.ones(max_batch_size, dtype=torch.int32, device=self.device)
        self.compile = bool(compile)
        self.skip_redundant_plans = skip_redundant_plans
        mode = compile if isinstance(compile, str) else None
        self._fwd = torch.compile(self._forward, dynamic=False, mode=mode) if compile \
            else self._forward
        self._model_kv = _OpaqueKV(kv_cache) if compile else kv_cache
        self._graphs: dict[int, _Bucket] = {}
        self._cascade_graphs: dict[int, _Bucket] = {}  # captured on first use
        self._pool: Any = None
        if cascade not in ("auto", "always", "never"):
            raise ValueError(f"cascade must be auto, always or never, not {cascade!r}")
        self.cascade = cascade
        if tree_attention is None:
            tree_attention = tree_attention_supported(backend, kv_cache)
        self.tree_attention = bool(tree_attention)
        self.cascade_rule = cascade_rule or (GRAPH_TREE_RULE if self.tree_attention
                                             else GRAPH_CASCADE_RULE)
        self.stats = {"cascade_steps": 0, "flat_steps": 0}
        # The graphs also take the greedy tokens (a caller that samples
        # itself, like the engine, passes False and saves their kernels).
        self.greedy = greedy
        windows = [w for w in (backend.sliding_windows or []) if w is not None]
        self._min_window = min(windows) if windows else None

    # -- capture --------------------------------------------------------------
    @torch.inference_mode()
    def capture(self) -> None:
        """Capture every bucket, largest first so smaller ones reuse its memory pool.

        With `tree_attention`, every bucket's cascade graph too (from 2 rows):
        a tree search meets most of them, and a capture in the middle of one
        would stall it (FlashInfer's cascade graphs stay captured on first use).
        """
        tree = self.tree_attention and self.cascade != "never" and not self.compile
        for bs in sorted(self.buckets, reverse=True):
            if bs not in self._graphs:
                self._graphs[bs] = self._capture(bs)
            if tree and bs >= 2 and bs not in self._cascade_graphs:
                self._cascade_graphs[bs] = self._capture(bs, cascade=True)
        torch.cuda.synchronize(self.device)

    def _static_meta(self, bs: int, gw: GraphDecodeWrapper) -> AttentionMetadata:
        return AttentionMetadata(
            positions=self.positions[:bs], slot_mapping=self.slot_mapping[:bs],
            qo_indptr=self.qo_indptr[:bs + 1], kv_indptr=gw.indptr, kv_indices=gw.indices,
            kv_last_page_len=gw.last_page_len, kv_lens=self.kv_lens[:bs], is_decode=True,
            page_size=self.page_size, host=None)

    def _forward(self, bs: int, meta: AttentionMetadata,
                 attn: _GraphAttention) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.model(self.input_ids[:bs], meta, self._model_kv, attn)
        logits = self.model.compute_logits(hidden)
        return logits, (greedy_tokens(logits) if self.greedy else None)

    def _capture(self, bs: int, cascade: bool = False) -> _Bucket:
        # Every row: one pad page holding one token, writing into the pad slot.
        self.slot_mapping[:bs].fill_(self.pad_slot)
        pad = torch.full((bs,), self.pad_page, dtype=torch.int32, device=self.device)
        rows, ones = torch.arange(bs + 1, dtype=torch.int32), torch.ones(bs, dtype=torch.int32)
        if cascade and self.tree_attention:  # every row: the pad page, nothing shared
            b = self.backend
            gw = TreeAttention(b.num_heads, b.num_kv_heads, b.head_dim, self.page_size, bs,
                               self.max_pages, self.device, sm_scale=b.sm_scale,
                               dtype=self.kv.dtype)
            gw.plan(rows.numpy(), pad, ones.numpy(), 0)
            meta = AttentionMetadata(
                positions=self.positions[:bs], slot_mapping=self.slot_mapping[:bs],
                qo_indptr=self.qo_indptr[:bs + 1], kv_indptr=self.qo_indptr[:bs + 1],
                kv_indices=gw.indices, kv_last_page_len=self.kv_lens[:bs],
                kv_lens=self.kv_lens[:bs], is_decode=True, page_size=self.page_size, host=None)
            attn = _GraphCascadeAttention(gw)
        elif cascade:  # the shared level: the pad page, as one full page
            gw = GraphCascadeWrapper(self.backend, bs, self.max_pages, self.skip_redundant_plans)
            gw.plan(pad[:1], rows, pad, ones)
            meta, attn = self._static_meta(bs, gw.unique), _GraphCascadeAttention(gw)
        else:
            gw = GraphDecodeWrapper(self.backend, bs, self.max_pages, self.skip_redundant_plans)
            gw.plan(rows, pad, ones)
            meta, attn = self._static_meta(bs, gw), _GraphAttention(
                gw, self.kv.kv if self.compile else None)
        # Warm up on a side stream (cuBLAS handles/workspaces, lazy inits), as
        # torch.cuda.graph's documentation asks.
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(3):  # (the first call compiles when `compile`)
                self._fwd(bs, meta, attn)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            logits, tokens = self._fwd(bs, meta, attn)
        if self._pool is None:
            self._pool = graph.pool()
        return _Bucket(bs, gw, graph, logits, tokens)

    # -- replay ---------------------------------------------------------------
    def can_run(self, meta: AttentionMetadata) -> bool:
        """True for decode steps this runner can replay (size, pages, windows)."""
        if not meta.is_decode or meta.host is None:
            return False
        b = meta.num_seqs
        if b < 1 or b > self.max_batch_size:
            return False
        if int(meta.kv_indices.shape[0]) + self.max_batch_size > self.max_pages:
            return False
        if self._min_window is not None and int(meta.host.kv_lens.max()) > self._min_window:
            return False  # graphs are captured with full attention only
        return True

    @torch.inference_mode()
    def run(self, input_ids: torch.Tensor | np.ndarray | Sequence[int],
            meta: AttentionMetadata,
            host_indices: np.ndarray | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Replay the bucket for `meta`'s B decode rows.

        `input_ids` [B] (device tensor, or host ids) in `meta`'s row order.
        `host_indices`: `meta.kv_indices` on the host, if the caller has them;
        needed to consider cascade (rows sharing a page prefix).
        Returns (`logits` float32 [B, V], greedy `tokens` int64 [B], or None
        without `greedy`), views of static buffers valid until the next `run()`.
        """
        b = meta.num_seqs
        bs = bucket_for(b, self.buckets)
        if bs is None or not meta.is_decode:
            raise ValueError(f"not a replayable decode step (B={b}, decode={meta.is_decode})")
        if meta.host is not None:
            kv_indptr, kv_last = meta.host.kv_indptr, meta.host.kv_last_page_len
        else:  # no host mirrors: read them back (a sync)
            kv_indptr, kv_last = meta.kv_indptr.cpu(), meta.kv_last_page_len.cpu()
        shared = self._shared_pages(meta, kv_indptr, host_indices)
        graphs = self._cascade_graphs if shared else self._graphs
        bucket = graphs.get(bs)
        if bucket is None:  # (capturing overwrites the static inputs: before copying them)
            bucket = graphs[bs] = self._capture(bs, cascade=bool(shared))
        if not isinstance(input_ids, torch.Tensor):
            input_ids = torch.as_tensor(np.asarray(input_ids, dtype=np.int64))
        self.input_ids[:b].copy_(input_ids, non_blocking=True)
        self.positions[:b].copy_(meta.positions, non_blocking=True)
        self.slot_mapping[:b].copy_(meta.slot_mapping, non_blocking=True)
        npad = bs - b
        if npad:
            self.slot_mapping[b:bs].fill_(self.pad_slot)
        if shared:
            self._plan_cascade(bucket.gw, meta, kv_indptr.numpy(), host_indices, kv_last,
                               shared, npad)
            self.stats["cascade_steps"] += 1
            bucket.graph.replay()
            return bucket.logits[:b], _rows(bucket.tokens, b)
        self.stats["flat_steps"] += 1
        if npad:
            # Padding rows: one pad page each holding one token.
            nnz = int(kv_indptr[-1])
            kv_indptr = torch.cat([kv_indptr, nnz + torch.arange(1, npad + 1, dtype=torch.int32)])
            kv_last = torch.cat([kv_last, torch.ones(npad, dtype=torch.int32)])
            bucket.gw.plan(kv_indptr, meta.kv_indices, kv_last)
            # plan() copied the real page ids; the pad rows' ids follow them.
            bucket.gw.indices[nnz:nnz + npad].fill_(self.pad_page)
        else:
            bucket.gw.plan(kv_indptr, meta.kv_indices, kv_last)
        bucket.graph.replay()
        return bucket.logits[:b], _rows(bucket.tokens, b)

    def _shared_pages(self, meta: AttentionMetadata, kv_indptr: torch.Tensor,
                      host_indices: np.ndarray | None) -> int:
        """Pages to run as the cascade's shared level this step (0: flat)."""
        b = meta.num_seqs
        if (self.cascade == "never" or self.compile or host_indices is None or b < 2
                or self._min_window is not None):
            return 0
        indptr = kv_indptr.numpy()
        shared = shared_prefix_pages(indptr, host_indices)
        if shared == 0 or self.cascade == "always":
            return shared
        shared_tokens = shared * self.page_size
        kv_lens = meta.host.kv_lens if meta.host is not None else meta.kv_lens.cpu()
        own_tokens = float(kv_lens.numpy().mean()) - shared_tokens
        return shared if self.cascade_rule(b, shared_tokens, own_tokens) else 0

    def _plan_cascade(self, cw: GraphCascadeWrapper | TreeAttention, meta: AttentionMetadata,
                      kv_indptr: np.ndarray, host_indices: np.ndarray,
                      kv_last: torch.Tensor, shared: int, npad: int) -> None:
        if isinstance(cw, TreeAttention):  # padding rows get no work (zero output)
            cw.plan(kv_indptr, meta.kv_indices, kv_last.numpy(), shared)
            return
        _, own_indptr, own_indices = split_levels(kv_indptr, host_indices, shared)
        if npad:  # padding rows: one pad page each holding one token
            own_indptr = np.concatenate(
                [own_indptr, own_indptr[-1] + np.arange(1, npad + 1, dtype=np.int32)])
            own_indices = np.concatenate(
                [own_indices, np.full(npad, self.pad_page, dtype=np.int32)])
            kv_last = torch.cat([kv_last, torch.ones(npad, dtype=torch.int32)])
        # Row 0's first pages are the shared ones: a device view, no host copy.
        cw.plan(meta.kv_indices[:shared], torch.from_numpy(own_indptr),
                torch.from_numpy(own_indices), kv_last)

    @property
    def captured_buckets(self) -> tuple[int, ...]:
        return tuple(sorted(self._graphs))

    @property
    def planner_calls(self) -> int:
        """FlashInfer planner calls so far, all buckets (skipped plans excluded)."""
        return sum(b.gw.plans for b in self._graphs.values())

    def set_skip_redundant_plans(self, on: bool) -> None:
        self.skip_redundant_plans = on
        for b in self._graphs.values():
            b.gw.skip_redundant_plans = on
        for b in self._cascade_graphs.values():
            if isinstance(b.gw, GraphCascadeWrapper):  # (TreeAttention has no planner to skip)
                b.gw.skip_redundant_plans = b.gw.unique.skip_redundant_plans = on

    def replay(self, batch_size: int) -> None:
        """Replay a captured bucket as last prepared by `run()` (for GPU-time benchmarks)."""
        self._graphs[batch_size].graph.replay()
