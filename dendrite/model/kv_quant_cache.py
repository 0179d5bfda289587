"""The device KV pool in the N-bit page format (dendrite/model/kv_quant.py).

One uint8 tensor `kv[num_layers, 2, num_pages, page_size, Hkv, row_bytes]`:
the same paged layout as `KVCache`, with each K or V vector replaced by its
packed row (rotated codes + fp16 scales and mins). A row carries its own
scales, so copy-on-write copies whole rows and a forked child's copied page
decodes exactly as its parent's. Quantization happens on write: one Triton
kernel per K or V on CUDA (dendrite/kernels/kv_quant_write.py), else torch
ops (`write` rotates, quantizes and scatters). The pool holds the format's
rotation matrix, which the attention backend uses to rotate q and un-rotate
the output. It is duck-typed like `KVCache` (`write`, `layer`,
`copy_pages`, `nbytes`), but it is not one: the fused RoPE + cache-write
kernel, the CUDA graphs and FlashInfer never see it.

`make_kv_cache` builds the pool a `kv_dtype` names (this one for "int4" /
"int3", a `KVCache` otherwise) and `page_bytes` sizes a page of either.
"""

from __future__ import annotations

import numpy as np
import torch

from dendrite.kernels import kv_quant_write
from dendrite.model.devices import check_device, check_int, check_kv_size
from dendrite.model.kv_cache import KVCache, KVFormat, cow_slot_pairs, kv_format
from dendrite.model.kv_quant import KVQuantFormat, kv_quant_format, rotation_matrix

__all__ = ["QuantKVCache", "make_kv_cache", "page_bytes"]


def page_bytes(kv_dtype: str | KVFormat | None, num_layers: int, page_size: int,
               num_kv_heads: int, head_dim: int, model_dtype: torch.dtype) -> int:
    """Bytes one page of the pool `kv_dtype` names takes (all layers, K and V)."""
    fmt = kv_format(kv_dtype)
    if fmt.bits is not None:
        qfmt = kv_quant_format(fmt.name, head_dim)
        return QuantKVCache.bytes_per_page(num_layers, page_size, num_kv_heads, qfmt)
    return KVCache.bytes_per_page(num_layers, page_size, num_kv_heads, head_dim,
                                  fmt.storage_dtype(model_dtype))


def make_kv_cache(kv_dtype: str | KVFormat | None, num_layers: int, num_pages: int,
                  page_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
                  device: torch.device | str) -> KVCache | QuantKVCache:
    """The pool `kv_dtype` names: a `QuantKVCache` for N-bit pages, else a `KVCache`."""
    fmt = kv_format(kv_dtype)
    if fmt.bits is None:
        return KVCache(num_layers, num_pages, page_size, num_kv_heads, head_dim, dtype, device,
                       kv_dtype=fmt)
    return QuantKVCache(num_layers, num_pages, page_size, num_kv_heads,
                        kv_quant_format(fmt.name, head_dim), device, dtype=dtype)


class QuantKVCache:
    """Paged K/V storage for every layer in N-bit packed rows, one allocation."""

    def __init__(
        self,
        num_layers: int,
        num_pages: int,
        page_size: int,
        num_kv_heads: int,
        fmt: KVQuantFormat,
        device: torch.device | str,
        *,
        dtype: torch.dtype = torch.float32,
        seed: int = 0,
    ) -> None:
        num_layers = check_int("num_layers", num_layers)
        num_pages = check_int("num_pages", num_pages)
        page_size = check_int("page_size", page_size)
        num_kv_heads = check_int("num_kv_heads", num_kv_heads)
        if not isinstance(fmt, KVQuantFormat):
            raise TypeError(f"fmt must be a KVQuantFormat, got {type(fmt).__name__}")
        device = check_device(device)
        check_kv_size(
            num_pages, page_size,
            self.bytes_per_page(num_layers, page_size, num_kv_heads, fmt), device,
        )
        self.num_layers, self.num_pages, self.page_size = num_layers, num_pages, page_size
        self.num_kv_heads, self.head_dim, self.fmt = num_kv_heads, fmt.head_dim, fmt
        # `dtype` is the model's (what attention returns), not the storage's.
        self.dtype, self.device = dtype, device
        self.storage_dtype = torch.uint8
        self.format = kv_format({4: "int4", 3: "int3"}[fmt.bits])
        self.rotation = rotation_matrix(fmt.head_dim, seed).to(device)
        #: quantize-on-write in one Triton kernel (CUDA); False: torch ops
        self.triton_write = kv_quant_write.supported(fmt, device)
        # Zero rows decode to zeros (scale 0, min 0): padded slots stay finite.
        self.kv = torch.zeros(
            num_layers, 2, num_pages, page_size, num_kv_heads, fmt.row_bytes,
            dtype=torch.uint8, device=device,
        )

    @staticmethod
    def bytes_per_page(
        num_layers: int, page_size: int, num_kv_heads: int, fmt: KVQuantFormat
    ) -> int:
        """Bytes one page takes across all layers (K and V, scales included)."""
        return page_size * fmt.bytes_per_token(num_layers, num_kv_heads)

    @property
    def nbytes(self) -> int:
        """Bytes of the whole cache tensor."""
        return self.kv.numel()

    @property
    def bytes_per_token(self) -> int:
        """KV bytes one token takes across all layers (K and V, scales included)."""
        return self.fmt.bytes_per_token(self.num_layers, self.num_kv_heads)

    @property
    def quantized(self) -> bool:
        """False: no per-layer `KVScales` apply (each row carries its own scales)."""
        return False

    def layer(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(K, V) packed pages of `layer`, each uint8 [num_pages, page_size, Hkv, row_bytes]."""
        return self.kv[layer, 0], self.kv[layer, 1]

    def rotate(self, x: torch.Tensor) -> torch.Tensor:
        """`x @ M` in float32 (the format's rotation), for [..., D]."""
        return x.float() @ self.rotation

    def write(
        self, layer: int, slot_mapping: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> None:
        """Rotate, quantize and store the step's new K/V ([T, Hkv, D]) at their slots."""
        k_cache, v_cache = self.layer(layer)
        if self.triton_write:
            kv_quant_write.write_rows(k, slot_mapping, k_cache, self.rotation, self.fmt)
            kv_quant_write.write_rows(v, slot_mapping, v_cache, self.rotation, self.fmt)
            return
        rb = self.fmt.row_bytes
        k_cache.view(-1, self.num_kv_heads, rb)[slot_mapping] = self.fmt.quantize(self.rotate(k))
        v_cache.view(-1, self.num_kv_heads, rb)[slot_mapping] = self.fmt.quantize(self.rotate(v))

    def copy_pages(self, copies: np.ndarray | torch.Tensor) -> None:
        """Execute copy-on-write rows `(src_page, dst_page, num_tokens)` (see KVCache).

        Whole packed rows move, scales with their codes."""
        idx = cow_slot_pairs(copies, self.num_pages, self.page_size, self.device)
        if idx is None:
            return
        flat = self.kv.view(self.num_layers, 2, -1, self.num_kv_heads, self.fmt.row_bytes)
        flat[:, :, idx[1]] = flat[:, :, idx[0]]
