"""Attention over N-bit KV pages (dendrite/model/kv_quant.py): torch reference + Triton decode.

The pages hold K and V rotated by the format's orthogonal matrix `M`. Since
`q.k = (q M).(k M)`, `forward` rotates q once, attends entirely in the
rotated space, and rotates the output back once (`o M^T`).

* Decode rows (one new token) on CUDA, when the Triton kernel supports the
  shapes and no layer has a sliding window: `dendrite.kernels.
  kv_quant_attention.decode_attention` reads the packed pages directly
  (decoded in registers, online softmax, split-KV, GQA).
* Everything else -- every row on the CPU, and prefill chunks on CUDA -- runs
  the torch reference (`ReferenceBackend`, float32) over K/V dequantized from
  the pages the row attends to, gathered into a temporary float32 buffer per
  step and layer. There is no compressed prefill kernel: prefill on CUDA
  costs a dequantized copy of each prefilled sequence's KV per layer.

Both read the same packed rows, so a sequence's tokens do not depend on
which path ran, beyond float rounding.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from dendrite.attention.base import AttentionMetadata
from dendrite.attention.reference import ReferenceBackend
from dendrite.kernels import kv_quant_attention as kqa
from dendrite.model.kv_quant import KVQuantFormat
from dendrite.model.kv_quant_cache import QuantKVCache

__all__ = ["QuantKVBackend", "make_quant_backend"]


class QuantKVBackend(ReferenceBackend):
    """AttentionBackend over packed N-bit pages (uint8 [num_pages, page_size, Hkv, row_bytes]).

    `rotation` is the pool's float32 [D, D] matrix (`QuantKVCache.rotation`).
    `use_triton`: None picks the Triton decode kernel where it runs (CUDA),
    False keeps every row on the torch reference.
    """

    name = "quant-kv"

    def __init__(
        self,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        fmt: KVQuantFormat,
        rotation: torch.Tensor,
        page_size: int = 16,
        sm_scale: float | None = None,
        sliding_windows: Sequence[int | None] | None = None,
        use_triton: bool | None = None,
    ) -> None:
        super().__init__(num_heads, num_kv_heads, head_dim, page_size, sm_scale, sliding_windows)
        if not isinstance(fmt, KVQuantFormat) or fmt.head_dim != head_dim:
            raise ValueError(f"fmt must be a KVQuantFormat of head_dim {head_dim}, got {fmt!r}")
        if tuple(rotation.shape) != (head_dim, head_dim):
            raise ValueError(
                f"rotation must be [{head_dim}, {head_dim}], got {tuple(rotation.shape)}"
            )
        self.fmt, self.rotation = fmt, rotation.float()
        windows = any(w is not None for w in (sliding_windows or ()))
        can = kqa.supported(fmt, num_heads, num_kv_heads, rotation.device) and not windows
        self.use_triton = can if use_triton is None else bool(use_triton and can)
        self._kernel: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int] | None
        self._kernel = None

    def _gather(self, cache: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        rows = cache.view(-1, self.num_kv_heads, self.fmt.row_bytes)[slots]
        return self.fmt.dequantize(rows)

    def plan(self, meta: AttentionMetadata) -> None:
        """Plan the reference part of the step and, on CUDA, the Triton decode rows."""
        self._kernel = None
        if not self.use_triton:
            super().plan(meta)
            return
        if meta.host is not None:
            qo, kvp, lens = meta.host.qo_indptr, meta.host.kv_indptr, meta.host.kv_lens
        else:
            qo, kvp, lens = meta.qo_indptr.cpu(), meta.kv_indptr.cpu(), meta.kv_lens.cpu()
        qo, kvp, lens = qo.numpy(), kvp.numpy(), lens.numpy()
        dec = np.diff(qo) == 1
        if dec.all() and len(dec):
            self._prefills, self._decode, self._planned = [], None, True
            self._kernel = (torch.arange(len(dec), device=meta.positions.device),
                            meta.kv_indptr, meta.kv_lens, meta.kv_indices, int(lens.max()))
            return
        super().plan(meta)
        self._decode = None  # the kernel does these rows
        if dec.any():
            packed = np.concatenate([qo[:-1][dec], kvp[:-1][dec], lens[dec]]).astype(np.int32)
            dev = torch.from_numpy(packed).to(meta.kv_indices.device, non_blocking=True)
            rows, starts, dl = dev.split(int(dec.sum()))
            self._kernel = (rows.long(), starts, dl, meta.kv_indices, int(lens[dec].max()))

    def forward(
        self, layer: int, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor
    ) -> torch.Tensor:
        """Attention output of `layer` ([T, Hq, D], q's dtype) over the packed pages."""
        if not self._planned:
            raise RuntimeError("QuantKVBackend.forward called before plan()")
        qr = q.float() @ self.rotation
        if self._kernel is None or self._prefills:
            out = super().forward(layer, qr, k_cache, v_cache)
        else:
            out = torch.empty_like(qr)
        if self._kernel is not None:
            rows, starts, lens, indices, max_len = self._kernel
            out[rows] = kqa.decode_attention(
                qr[rows], k_cache, v_cache, starts, indices, lens, self.fmt, self.sm_scale,
                max_kv_len=max_len)
        return (out @ self.rotation.T).to(q.dtype)


def make_quant_backend(
    attention: object,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    page_size: int,
    pool: QuantKVCache,
    sliding_windows: Sequence[int | None] | None = None,
) -> QuantKVBackend:
    """The backend of an N-bit pool for the runner's `attention` argument: "auto" (Triton
    decode where it runs), "reference" (torch only) or a ready `QuantKVBackend`."""
    name = pool.format.name
    if not isinstance(attention, str):
        if not isinstance(attention, QuantKVBackend):
            raise ValueError(f"kv_dtype={name!r} needs an attention backend that reads N-bit "
                             f"pages (QuantKVBackend); got {type(attention).__name__}")
        return attention
    if attention not in ("auto", "reference"):
        raise ValueError(f"kv_dtype={name!r}: attention must be 'auto' or 'reference' "
                         f"(FlashInfer cannot read N-bit pages), got {attention!r}")
    return QuantKVBackend(num_heads, num_kv_heads, head_dim, pool.fmt, pool.rotation, page_size,
                          sliding_windows=sliding_windows,
                          use_triton=None if attention == "auto" else False)
