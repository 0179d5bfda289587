"""Benchmark-only variants of the engine's decode CUDA graphs (bench_gpu_model.py).

The engine replays `CudaGraphDecodeRunner` graphs that end at the logits and
samples outside them (dendrite/model/cuda_graph.py). benchmarks/bench_gpu_model.py
also measures two variants that the engine does not use, kept here:

* `GreedyGraphRunner`: the graph also takes the greedy argmax of the logits
  (`greedy_tokens`), so a single-stream greedy loop can keep its tokens on
  the device ("pipelined" in that benchmark);
* `CompiledGraphRunner`: the captured forward first goes through
  `torch.compile`, so the elementwise tails (RMSNorm, RoPE, SiLU*up, residual
  adds) fuse into a few Triton kernels; the K/V write and the FlashInfer call
  are opaque custom ops over the whole pool (`_ops`). Flat decode only.

`set_skip_redundant_plans` switches the graphs' FlashInfer plan reuse (the
benchmark's "sync_replan" mode measures the planner on every step).
"""

from __future__ import annotations

from typing import Any

import torch

from dendrite.attention.base import AttentionMetadata
from dendrite.attention.flashinfer_backend import GraphCascadeWrapper, GraphDecodeWrapper
from dendrite.model.cuda_graph import CudaGraphDecodeRunner, _GraphAttention
from dendrite.model.kv_cache import KVCache

__all__ = ["CompiledGraphRunner", "GreedyGraphRunner", "greedy_tokens", "scatter_rows",
           "set_skip_redundant_plans"]


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



class _OpAttention(_GraphAttention):
    """Flat decode attention through the custom op over the whole pool (compiled capture)."""

    def __init__(self, gw: GraphDecodeWrapper, kv: torch.Tensor) -> None:
        super().__init__(gw)
        self.kv = kv
        self.wrapper_id = id(gw)
        _WRAPPERS[self.wrapper_id] = gw
        self.op = _ops()["attention"]

    def forward(self, layer: int, q: torch.Tensor, k_cache: torch.Tensor,
                v_cache: torch.Tensor) -> torch.Tensor:
        return self.op(q, self.kv, layer, self.wrapper_id)


class GreedyGraphRunner(CudaGraphDecodeRunner):
    """`CudaGraphDecodeRunner` whose graphs also take the greedy tokens:
    `run()` returns (`logits` float32 [B, V], `tokens` int64 [B]), views of
    static buffers valid until the next `run()`."""

    def _forward(self, bs: int, meta: AttentionMetadata, attn: _GraphAttention) -> Any:
        logits = super()._forward(bs, meta, attn)
        return logits, greedy_tokens(logits)

    def _outputs(self, out: Any, b: int) -> Any:
        logits, tokens = out
        return logits[:b], tokens[:b]


class CompiledGraphRunner(GreedyGraphRunner):
    """`GreedyGraphRunner` over a `torch.compile`d forward (flat decode only).

    `mode`: the compile mode (e.g. "max-autotune-no-cudagraphs"; never a
    CUDA-graph mode: the runner captures the graphs itself). It costs a
    compile per bucket (the first of the warm-up calls before capture).
    """

    def __init__(self, *args: Any, mode: str | None = None, **kwargs: Any) -> None:
        kwargs["cascade"] = "never"
        super().__init__(*args, **kwargs)
        self._opaque_kv = _OpaqueKV(self.kv)
        self._compiled = torch.compile(self._eager_forward, dynamic=False, mode=mode)

    def _eager_forward(self, bs: int, meta: AttentionMetadata, attn: _GraphAttention) -> Any:
        hidden = self.model(self.input_ids[:bs], meta, self._opaque_kv, attn,
                            kernels=self.kernels)
        logits = self.model.compute_logits(hidden, self.kernels)
        return logits, greedy_tokens(logits)

    def _forward(self, bs: int, meta: AttentionMetadata, attn: _GraphAttention) -> Any:
        return self._compiled(bs, meta, attn)

    def _flat_attention(self, gw: GraphDecodeWrapper) -> _GraphAttention:
        return _OpAttention(gw, self.kv.kv)


def set_skip_redundant_plans(graphs: CudaGraphDecodeRunner, on: bool) -> None:
    """Reuse (True, the engine's setting) or recompute FlashInfer's decode
    schedule while no row's page count changed, in every captured bucket."""
    for b in graphs._graphs.values():
        b.gw.skip_redundant_plans = on
    for b in graphs._cascade_graphs.values():
        if isinstance(b.gw, GraphCascadeWrapper):  # (TreeAttention has no planner to skip)
            b.gw.skip_redundant_plans = b.gw.unique.skip_redundant_plans = on
