"""The device KV pool and copy-on-write execution.

One tensor `kv[num_layers, 2, num_pages, page_size, Hkv, D]`; `kv[l, 0]` and
`kv[l, 1]` are layer `l`'s K and V caches in FlashInfer's NHD paged layout.
Page ids come from the native core; this module never decides who owns a page.
Its sizes, dtype and device are checked (ValueError naming the argument)
before the pool is allocated.
"""

from __future__ import annotations

import numpy as np
import torch

from dendrite.model.devices import check_device, check_dtype, check_int, check_kv_size

__all__ = ["KVCache"]


class KVCache:
    """Paged K/V storage for every layer in one allocation."""

    def __init__(
        self,
        num_layers: int,
        num_pages: int,
        page_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        num_layers = check_int("num_layers", num_layers)
        num_pages = check_int("num_pages", num_pages)
        page_size = check_int("page_size", page_size)
        num_kv_heads = check_int("num_kv_heads", num_kv_heads)
        head_dim = check_int("head_dim", head_dim)
        if check_dtype(dtype) is None:
            raise TypeError("dtype must be given (float32, float16 or bfloat16), got None")
        dtype, device = check_dtype(dtype), check_device(device)
        check_kv_size(
            num_pages,
            page_size,
            self.bytes_per_page(num_layers, page_size, num_kv_heads, head_dim, dtype),
            device,
        )
        self.num_layers, self.num_pages, self.page_size = num_layers, num_pages, page_size
        self.num_kv_heads, self.head_dim = num_kv_heads, head_dim
        self.dtype, self.device = dtype, device
        # zeros, not empty: padded/unused slots are masked, but NaN garbage
        # times a zero attention weight would still be NaN.
        self.kv = torch.zeros(
            num_layers,
            2,
            num_pages,
            page_size,
            num_kv_heads,
            head_dim,
            dtype=dtype,
            device=self.device,
        )

    @staticmethod
    def bytes_per_page(
        num_layers: int, page_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype
    ) -> int:
        """Bytes one page takes across all layers (K and V)."""
        elem = torch.empty((), dtype=dtype).element_size()
        return num_layers * 2 * page_size * num_kv_heads * head_dim * elem

    @property
    def nbytes(self) -> int:
        """Bytes of the whole cache tensor."""
        return self.kv.numel() * self.kv.element_size()

    def layer(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(K, V) caches of `layer`, each [num_pages, page_size, Hkv, D]."""
        return self.kv[layer, 0], self.kv[layer, 1]

    def write(
        self, layer: int, slot_mapping: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> None:
        """Store the step's new K/V ([T, Hkv, D]) at their slots."""
        k_cache, v_cache = self.layer(layer)
        k_cache.view(-1, self.num_kv_heads, self.head_dim)[slot_mapping] = k
        v_cache.view(-1, self.num_kv_heads, self.head_dim)[slot_mapping] = v

    def copy_pages(self, copies: np.ndarray | torch.Tensor) -> None:
        """Execute copy-on-write rows `(src_page, dst_page, num_tokens)`.

        Copies the first `num_tokens` slots of `src` into `dst`, for all layers
        and both K and V, as one gather plus one scatter. Must run before the
        step's forward writes new tokens into `dst`. All sources are read
        before any destination is written, so rows may chain safely.
        """
        if isinstance(copies, torch.Tensor):
            copies = copies.detach().cpu().numpy()
        rows = np.asarray(copies, dtype=np.int64).reshape(-1, 3)
        rows = rows[rows[:, 2] > 0]
        if len(rows) == 0:
            return
        src, dst, n = rows[:, 0], rows[:, 1], rows[:, 2]
        if (
            (n > self.page_size).any()
            or (rows[:, :2] < 0).any()
            or (rows[:, :2] >= self.num_pages).any()
        ):
            raise ValueError(
                f"invalid copy-on-write rows {rows.tolist()} for "
                f"{self.num_pages} pages of {self.page_size}"
            )
        # Token offsets 0..n-1 of every row, without a per-row Python loop.
        offs = np.arange(n.sum()) - np.repeat(np.cumsum(n) - n, n)
        idx = torch.from_numpy(
            np.stack(
                [
                    np.repeat(src, n) * self.page_size + offs,
                    np.repeat(dst, n) * self.page_size + offs,
                ]
            )
        )
        idx = idx.to(self.device, non_blocking=True)
        flat = self.kv.view(self.num_layers, 2, -1, self.num_kv_heads, self.head_dim)
        flat[:, :, idx[1]] = flat[:, :, idx[0]]
