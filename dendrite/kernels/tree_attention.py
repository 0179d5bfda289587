"""Decode attention for the leaves of one tree: the shared prefix read once, in two kernels.

B leaves forked off one context share its first pages. Flat paged decode
reads those pages once per leaf; FlashInfer's two-level cascade reads them
once but takes five kernels a layer (a prefill-style pass over the shared
level, the per-leaf decode and its split-KV merge, the cross-level merge and
their elementwise glue: ~24 us a layer at 16 leaves over 4K tokens on an
H100, where one leaf's flat decode takes ~12 us). Here one step is

* `plan()` on the host (numpy, outside any CUDA graph): cut the work into
  items of about equal size. An item is a run of up to `leaves_per_tile`
  leaves and a token range of one page list; the shared prefix is split
  into items whose rows are all the leaves of a tile (its K/V streams once
  for all of them, on the tensor cores), each leaf's own tokens into items
  of that leaf alone. Every item owns one split slot of each of its leaves.
* `tree_attention_partial`: a persistent grid over (item, KV head) writes
  each item's normalized partial output and log-sum-exp into its slots.
* `tree_attention_merge`: per (leaf, query head), the log-sum-exp-weighted
  sum of the leaf's slots.

With `shared_pages=0` the same kernels are flat split-KV decode. All inputs
that change per step live in fixed buffers (`indices`, `sched`), so `run()`
can be captured in a CUDA graph once per batch size and replayed.

FP8 pages (float8_e4m3fn, dendrite/model/kv_cache.py): the partial kernel
loads the bytes and converts K/V to the query dtype in registers (no
dequantized copy); `run(k_scale=, v_scale=)` folds the layer's K scale into
the softmax scale and multiplies each partial output by the V scale, so the
scales cost nothing. Triton's fp8 conversions need compute capability 8.9+.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from dendrite.kernels.config import KernelConfig, triton_available
from dendrite.kernels.rows import fp8_supported

__all__ = ["TreeAttention", "WorkPlan", "plan_work", "supported"]

#: Item fields, in the order the kernel reads them.
ITEM_FIELDS = ("leaf", "leaves", "page_offset", "start", "end", "split")

_ALL = KernelConfig()


def supported(num_heads: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
              device: torch.device | str, kernels: KernelConfig = _ALL,
              kv_dtype: torch.dtype | None = None) -> bool:
    """Whether `TreeAttention` can run these shapes (queries in `dtype`, pages in
    `kv_dtype`, default `dtype`) and `kernels.tree_attention` allows it."""
    kv_ok = kv_dtype in (None, dtype) or (kv_dtype == torch.float8_e4m3fn
                                          and fp8_supported(device))
    return (kernels.tree_attention and torch.device(device).type == "cuda"
            and dtype in (torch.float16, torch.bfloat16) and kv_ok
            and num_heads % num_kv_heads == 0 and head_dim in (64, 128, 256)
            and triton_available())


@dataclass
class WorkPlan:
    """`items` int32 [n, 6] (see ITEM_FIELDS), `splits` int32 [B] slots per leaf,
    `tokens_per_item` the chunk length used."""

    items: np.ndarray
    splits: np.ndarray
    tokens_per_item: int


def plan_work(kv_indptr: Any, kv_last_page_len: Any, page_size: int, shared_pages: int, *,
              leaves_per_tile: int, target_items: int, max_splits: int, max_items: int,
              block_n: int, items_out: np.ndarray | None = None,
              splits_out: np.ndarray | None = None) -> WorkPlan:
    """Cut a decode step's attention into items (see the module docstring).

    `kv_indptr` [B+1] / `kv_last_page_len` [B]: each leaf's CSR page list;
    its first `shared_pages` pages are the ones every leaf shares (full pages,
    never a leaf's last one). Items hold about `total tokens read /
    target_items` tokens, a multiple of `block_n`, lengthened until no leaf
    needs more than `max_splits` slots and there are at most `max_items`.
    The native core plans (it runs every step); `items_out` [max_items, 6] /
    `splits_out` [B] int32, when given, receive the result in place (views
    of a staging buffer), and the returned arrays are views of them.
    """
    indptr = np.ascontiguousarray(kv_indptr, dtype=np.int32)
    last = np.ascontiguousarray(kv_last_page_len, dtype=np.int32)
    if items_out is None:
        items_out = np.empty((max_items, len(ITEM_FIELDS)), dtype=np.int32)
    if splits_out is None:
        splits_out = np.empty(len(last), dtype=np.int32)
    n, chunk = _native().plan_tree_attention(
        indptr, last, int(shared_pages), int(page_size), int(leaves_per_tile),
        int(target_items), int(max_splits), int(max_items), int(block_n), items_out, splits_out)
    return WorkPlan(items_out.reshape(-1, len(ITEM_FIELDS))[:n], splits_out[:len(last)], chunk)


def _native() -> Any:
    from dendrite import _native as native  # noqa: PLC0415 (the kv module explains a missing build)

    return native


class TreeAttention:
    """Graph-capturable decode attention for `batch_size` rows (see the module docstring).

    Args:
        num_heads, num_kv_heads, head_dim, page_size: the model's attention
            shape and the cache's page size (K/V caches are the NHD views
            `[num_pages, page_size, Hkv, D]`).
        batch_size: rows of `q` in `run()`; a plan may cover fewer (the rest
            are padding rows: their output is zeros).
        max_pages: capacity of the page-id buffer (total over the rows).
        sm_scale: softmax scale; default 1/sqrt(D).
        max_splits: split slots per leaf (a power of two).
        programs: persistent grid size; default 4 per SM.
        items_per_sm: the planner's target, items per SM per KV head.
        block_n: tokens per inner step (K/V rows loaded at once).
        num_warps, num_stages: of the partial kernel.
        leaves_per_tile: leaves whose queries share a tile over the shared
            pages; default as many as fill 64 rows (16 at GQA group 4).
        dtype: of the queries and outputs; the split slots' partial outputs
            are kept in it too (as FlashInfer keeps its split-KV partials),
            their log-sum-exp in float32.

    The tiling defaults won a sweep of 324 (benchmarks/bench_kernels_gpu.py
    --sections tree --tree-sweep, H100, docs/benchmarks.md) at 16 leaves over
    4K shared tokens and came within 7% of the best for one 4K sequence.
    """

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, page_size: int,
                 batch_size: int, max_pages: int, device: torch.device | str, *,
                 sm_scale: float | None = None, max_splits: int = 64,
                 programs: int | None = None, items_per_sm: float = 4.0,
                 block_n: int = 64, num_warps: int = 4, num_stages: int = 2,
                 leaves_per_tile: int | None = None, dtype: torch.dtype = torch.bfloat16) -> None:
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads={num_heads} is not a multiple of "
                             f"num_kv_heads={num_kv_heads}")
        if max_splits & (max_splits - 1):
            raise ValueError(f"max_splits must be a power of two, not {max_splits}")
        self.device = torch.device(device)
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.group = num_heads // num_kv_heads
        self.page_size = page_size
        self.batch_size = batch_size
        self.sm_scale = sm_scale if sm_scale is not None else 1.0 / math.sqrt(head_dim)
        self.max_splits = max_splits
        # A tile's rows are its leaves' GQA groups: 64 rows fill one MMA tile
        # on the M side and keep the float32 accumulator in registers.
        self.leaves_per_tile = leaves_per_tile or max(1, 64 // self.group)
        self.block_m = max(16, 1 << (self.leaves_per_tile * self.group - 1).bit_length())
        self.block_n = block_n
        self.num_warps, self.num_stages = num_warps, num_stages
        sms = (torch.cuda.get_device_properties(self.device).multi_processor_count
               if self.device.type == "cuda" else 8)
        self.programs = programs or 4 * sms
        self.target_items = max(1, round(items_per_sm * sms / num_kv_heads))
        # Room for 4x the target, and never fewer than the least a plan
        # needs: one prefix item per tile and one own item per leaf.
        tiles = -(-batch_size // self.leaves_per_tile)
        self.max_items = max(4 * self.target_items, tiles + batch_size)
        self.splits_offset = 1
        self.items_offset = 1 + batch_size
        i32 = torch.int32
        self.indices = torch.zeros(max_pages, dtype=i32, device=self.device)
        self.sched = torch.zeros(self.items_offset + 6 * self.max_items, dtype=i32,
                                 device=self.device)
        self.o_part = torch.empty((batch_size, num_heads, max_splits, head_dim),
                                  dtype=dtype, device=self.device)
        self.lse_part = torch.empty((batch_size, num_heads, max_splits), dtype=torch.float32,
                                    device=self.device)
        self.last_plan: WorkPlan | None = None

    def plan(self, kv_indptr: Any, kv_indices: torch.Tensor | np.ndarray, kv_last_page_len: Any,
             shared_pages: int = 0) -> WorkPlan:
        """Schedule the next `run()`: host indptr / last page lengths, page ids
        (device or host), and how many leading pages all rows share."""
        indptr = np.asarray(kv_indptr, dtype=np.int32)
        b = len(indptr) - 1
        if b > self.batch_size:
            raise ValueError(f"{b} rows planned on a TreeAttention for {self.batch_size}")
        n = int(indptr[-1])
        if n > self.indices.shape[0]:
            raise ValueError(f"{n} pages exceed the page buffer ({self.indices.shape[0]})")
        # Planned straight into a pinned staging buffer (torch's caching host
        # allocator keeps it until the asynchronous copy out of it has run).
        staged = torch.empty(self.sched.shape, dtype=torch.int32,
                             pin_memory=self.device.type == "cuda")
        buf = staged.numpy()
        wp = plan_work(indptr, kv_last_page_len, self.page_size, shared_pages,
                       leaves_per_tile=self.leaves_per_tile, target_items=self.target_items,
                       max_splits=self.max_splits, max_items=self.max_items,
                       block_n=self.block_n,
                       items_out=buf[self.items_offset:].reshape(self.max_items, 6),
                       splits_out=buf[self.splits_offset:self.splits_offset + b])
        buf[0] = len(wp.items)
        buf[self.splits_offset + b:self.items_offset] = 0  # padding rows: no slots
        used = self.items_offset + 6 * len(wp.items)
        self.sched[:used].copy_(staged[:used], non_blocking=True)
        if isinstance(kv_indices, np.ndarray):
            kv_indices = torch.from_numpy(np.ascontiguousarray(kv_indices, dtype=np.int32))
        self.indices[:n].copy_(kv_indices[:n], non_blocking=True)
        # (copied: the staging buffer is reused once its copy has run)
        self.last_plan = WorkPlan(wp.items.copy(), wp.splits.copy(), wp.tokens_per_item)
        return self.last_plan

    def run(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
            k_scale: float = 1.0, v_scale: float = 1.0) -> torch.Tensor:
        """Attention of `q` [batch_size, Hq, D] as planned; returns [batch_size, Hq, D].

        The caches hold the query dtype or float8_e4m3fn; `k_scale` / `v_scale`
        dequantize FP8 pages (value = stored * scale)."""
        from dendrite.kernels._tree_attention_triton import (  # noqa: PLC0415
            tree_attention_merge,
            tree_attention_partial,
        )

        q = q.contiguous()
        if q.dtype != self.o_part.dtype:
            raise ValueError(f"q is {q.dtype}, this TreeAttention was built for "
                             f"{self.o_part.dtype}")
        if tuple(q.shape) != (self.batch_size, self.num_heads, self.head_dim):
            raise ValueError(f"q is {tuple(q.shape)}, expected "
                             f"({self.batch_size}, {self.num_heads}, {self.head_dim})")
        _, page, hkv, d = k_cache.shape
        if (page, hkv, d) != (self.page_size, self.num_kv_heads, self.head_dim) \
                or k_cache.stride()[1:] != (hkv * d, d, 1) or v_cache.stride() != k_cache.stride():
            raise ValueError(f"K/V caches must be NHD pages {self.page_size} x "
                             f"{self.num_kv_heads} x {self.head_dim} with dense tokens")
        if k_cache.dtype not in (q.dtype, torch.float8_e4m3fn) or v_cache.dtype != k_cache.dtype:
            raise ValueError(f"K/V caches must be {q.dtype} or float8_e4m3fn, got "
                             f"{k_cache.dtype} / {v_cache.dtype}")
        out = torch.empty_like(q)
        tree_attention_partial[(self.programs,)](
            q, k_cache, v_cache, self.indices, self.sched, self.o_part, self.lse_part,
            self.sm_scale * float(k_scale) * math.log2(math.e), float(v_scale),
            k_cache.stride(0), k_cache.stride(1),
            self.items_offset, HQ=self.num_heads, HKV=self.num_kv_heads,
            D=self.head_dim, GROUP=self.group, PAGE=self.page_size,
            MAX_SPLITS=self.max_splits, BLOCK_M=self.block_m, BLOCK_N=self.block_n,
            num_warps=self.num_warps, num_stages=self.num_stages)
        tree_attention_merge[(self.batch_size, self.num_heads)](
            self.o_part, self.lse_part, self.sched, out, self.splits_offset,
            HQ=self.num_heads, D=self.head_dim, MAX_SPLITS=self.max_splits)
        return out
