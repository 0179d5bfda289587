"""CUDA graphs for decode steps: one captured forward per batch-size bucket.

A decode step of a small model is hundreds of tiny kernels; launched from
Python each costs more than it computes. Here the whole step -- embedding,
every layer (K/V write + FlashInfer decode attention), final norm and the
logits of the B rows -- is captured once per bucket (1, 2, 4, 8, ... up to
`max_batch_size`) and replayed. `ModelRunner` owns one and decides per step
whether it replays or the eager path runs.

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

The kernels captured are those the runner's `KernelConfig` allows (fixed at
capture). An FP8 pool's per-layer scales are passed to every layer's
attention call (`_GraphAttention`) and baked into the graph at capture.
The output (`logits` [B, V] float32) is a view of a static buffer: the next
`run()` overwrites it, so consume or copy it first.
No host sync happens in `run()` except the backend's `PlanFence` when a
bucket's wrapper is re-planned: it keeps FlashInfer's pinned planning buffer
from being rewritten while the previous plan's copy out of it is still queued.
"""

from __future__ import annotations

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
    scale_kwargs,
)
from dendrite.kernels import tree_attention
from dendrite.kernels.config import KernelConfig
from dendrite.kernels.tree_attention import TreeAttention
from dendrite.model.kv_cache import KVCache, KVScales

__all__ = ["CudaGraphDecodeRunner", "DEFAULT_BUCKETS", "GRAPH_CASCADE_RULE", "GRAPH_TREE_RULE",
           "bucket_for", "tree_attention_supported"]

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


def tree_attention_supported(backend: FlashInferBackend, kv_cache: KVCache,
                             kernels: KernelConfig = KernelConfig()) -> bool:
    """Whether cascade graphs can use `TreeAttention` for this backend and cache."""
    return (not any(w is not None for w in (backend.sliding_windows or []))
            and tree_attention.supported(backend.num_heads, backend.num_kv_heads,
                                         backend.head_dim, kv_cache.dtype, kv_cache.device,
                                         kernels, kv_dtype=kv_cache.storage_dtype))


def bucket_for(batch_size: int, buckets: Sequence[int]) -> int | None:
    """Smallest bucket >= batch_size (buckets sorted ascending), None if too big."""
    for b in buckets:
        if b >= batch_size:
            return b
    return None


class _GraphAttention:
    """The backend the model sees while a bucket is captured.

    `plan()` is a no-op (the runner plans the bucket's wrapper before each
    replay); `forward()` runs that wrapper (FlashInfer's flat decode or two
    cascade levels, or Dendrite's `TreeAttention`), so the captured kernels
    read the wrapper's fixed buffers. `scales`: an FP8 pool's per-layer
    scales, passed to the wrapper with each layer's call.
    """

    def __init__(self, gw: GraphDecodeWrapper | GraphCascadeWrapper | TreeAttention,
                 scales: KVScales | None = None) -> None:
        self.gw = gw
        self.scales = scales

    def plan(self, meta: AttentionMetadata) -> None:  # planned outside the graph
        return None

    def forward(self, layer: int, q: torch.Tensor, k_cache: torch.Tensor,
                v_cache: torch.Tensor) -> torch.Tensor:
        return self.gw.run(q, k_cache, v_cache, **scale_kwargs(self.scales, layer))


@dataclass
class _Bucket:
    size: int
    gw: GraphDecodeWrapper | GraphCascadeWrapper | TreeAttention
    graph: torch.cuda.CUDAGraph
    out: Any  # what `_forward` returned at capture: float32 logits [size, V]


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
        cascade: "auto" (a step whose rows share a long page prefix replays
            a cascade graph when `cascade_rule` says so), "always" (whenever
            rows share a page), "never".
        cascade_rule: `(rows, shared_tokens, own_tokens) -> bool`, default
            `GRAPH_TREE_RULE` with `tree_attention`, else `GRAPH_CASCADE_RULE`.
        tree_attention: cascade graphs run Dendrite's `TreeAttention`
            kernels (the shared pages and every row's own pages in one
            split-KV pass plus a merge) instead of FlashInfer's two levels;
            default: where `tree_attention_supported` (and `kernels`) allow.
        kernels: the kernel families the captured forward may use.
    """

    def __init__(self, model: Any, kv_cache: KVCache, backend: FlashInferBackend, *,
                 max_batch_size: int = 64, buckets: Sequence[int] = DEFAULT_BUCKETS,
                 pad_page: int | None = None, max_pages: int | None = None,
                 max_seq_len: int | None = None, cascade: str = "auto",
                 cascade_rule: Any = None, tree_attention: bool | None = None,
                 kernels: KernelConfig | None = None) -> None:
        if kv_cache.device.type != "cuda":
            raise ValueError("CUDA graphs need a CUDA KV cache")
        self.model, self.kv, self.backend = model, kv_cache, backend
        self._scales = kv_cache.scales if kv_cache.quantized else None
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
        self.kernels = kernels if kernels is not None else KernelConfig()
        self._graphs: dict[int, _Bucket] = {}
        self._cascade_graphs: dict[int, _Bucket] = {}  # captured on first use
        self._pool: Any = None
        if cascade not in ("auto", "always", "never"):
            raise ValueError(f"cascade must be auto, always or never, not {cascade!r}")
        self.cascade = cascade
        if tree_attention is None:
            tree_attention = tree_attention_supported(backend, kv_cache, self.kernels)
        self.tree_attention = bool(tree_attention)
        self.cascade_rule = cascade_rule or (GRAPH_TREE_RULE if self.tree_attention
                                             else GRAPH_CASCADE_RULE)
        self.stats = {"cascade_steps": 0, "flat_steps": 0}
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
        tree = self.tree_attention and self.cascade != "never"
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

    def _forward(self, bs: int, meta: AttentionMetadata, attn: _GraphAttention) -> Any:
        """What a bucket captures: the forward of its rows to float32 logits [bs, V]."""
        hidden = self.model(self.input_ids[:bs], meta, self.kv, attn, kernels=self.kernels)
        return self.model.compute_logits(hidden, self.kernels)

    def _flat_attention(self, gw: GraphDecodeWrapper) -> _GraphAttention:
        """The attention a flat bucket captures around its decode wrapper."""
        return _GraphAttention(gw, self._scales)

    def _outputs(self, out: Any, b: int) -> Any:
        """The first `b` rows of a bucket's captured output (what `run` returns)."""
        return out[:b]

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
            attn = _GraphAttention(gw, self._scales)
        elif cascade:  # the shared level: the pad page, as one full page
            gw = GraphCascadeWrapper(self.backend, bs, self.max_pages)
            gw.plan(pad[:1], rows, pad, ones)
            meta, attn = self._static_meta(bs, gw.unique), _GraphAttention(gw, self._scales)
        else:
            gw = GraphDecodeWrapper(self.backend, bs, self.max_pages)
            gw.plan(rows, pad, ones)
            meta, attn = self._static_meta(bs, gw), self._flat_attention(gw)
        # Warm up on a side stream (cuBLAS handles/workspaces, lazy inits), as
        # torch.cuda.graph's documentation asks.
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(3):
                self._forward(bs, meta, attn)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            out = self._forward(bs, meta, attn)
        if self._pool is None:
            self._pool = graph.pool()
        return _Bucket(bs, gw, graph, out)

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
            meta: AttentionMetadata, host_indices: np.ndarray | None = None) -> torch.Tensor:
        """Replay the bucket for `meta`'s B decode rows.

        `input_ids` [B] (device tensor, or host ids) in `meta`'s row order.
        `host_indices`: `meta.kv_indices` on the host, if the caller has them;
        needed to consider cascade (rows sharing a page prefix).
        Returns `logits` float32 [B, V], a view of a static buffer valid until
        the next `run()`.
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
            return self._outputs(bucket.out, b)
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
        return self._outputs(bucket.out, b)

    def _shared_pages(self, meta: AttentionMetadata, kv_indptr: torch.Tensor,
                      host_indices: np.ndarray | None) -> int:
        """Pages to run as the cascade's shared level this step (0: flat)."""
        b = meta.num_seqs
        if (self.cascade == "never" or host_indices is None or b < 2
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
        """Batch sizes that have a captured graph, ascending."""
        return tuple(sorted(self._graphs))

    @property
    def planner_calls(self) -> int:
        """FlashInfer planner calls so far, all buckets (skipped plans excluded)."""
        return sum(b.gw.plans for b in self._graphs.values())

    def replay(self, batch_size: int) -> None:
        """Replay a captured bucket as last prepared by `run()` (for GPU-time benchmarks)."""
        self._graphs[batch_size].graph.replay()
