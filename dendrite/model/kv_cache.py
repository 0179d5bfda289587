"""The device KV pool and copy-on-write execution, in the model dtype or FP8.

One tensor `kv[num_layers, 2, num_pages, page_size, Hkv, D]`; `kv[l, 0]` and
`kv[l, 1]` are layer `l`'s K and V caches in FlashInfer's NHD paged layout.
Page ids come from the native core; this module never decides who owns a page.
Its sizes, dtype and device are checked (ValueError naming the argument)
before the pool is allocated.

The element format of the pool is a `KVFormat` (`kv_format(kv_dtype)`, the one
place a KV dtype name is turned into storage): "auto" stores K/V in the model
dtype; "fp8_e4m3" stores `torch.float8_e4m3fn` (one byte an element, twice the
tokens in the same memory) with static per-layer scales for K and for V
(`KVScales`): stored = clamp(value / scale, -448, 448), value = stored * scale.
K is stored less a static per-(layer, head, channel) vector `k_mean` (the
calibrated mean of K after RoPE): every key of a query's softmax moves by the
same q . k_mean, so attention is unchanged and no reader knows about it, but
the stored magnitudes -- and with them e4m3's rounding errors -- shrink.
The scales and k_mean are per layer, not per page, so a copy-on-write copy
moves bytes only and a fork touches nothing. Readers fold the scales into the
attention they already do (K's into the softmax scale, V's into the output),
so no kernel needs a dequantized copy (docs/quantization.md says why, and how
both are calibrated, dendrite/model/kv_calibration.py).

"int4" and "int3" name N-bit page formats (rotated, 3-4 bit codes with a
scale per row, dendrite/model/kv_quant.py): their pool is a `QuantKVCache`
(dendrite/model/kv_quant_cache.py, `make_kv_cache` picks), not a `KVCache`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from dendrite.model.devices import check_device, check_dtype, check_int, check_kv_size

__all__ = [
    "FP8_E4M3_MAX",
    "KV_DTYPES",
    "KVCache",
    "KVFormat",
    "KVScales",
    "cow_slot_pairs",
    "dequantize",
    "kv_format",
    "quantize",
]

#: The KV dtype names `kv_format` accepts (None means "auto").
KV_DTYPES = ("auto", "fp8_e4m3", "int4", "int3")

#: Largest finite magnitude of float8_e4m3fn; stores saturate here, never overflow to NaN.
FP8_E4M3_MAX = 448.0


@dataclass(frozen=True)
class KVFormat:
    """How the KV pool stores an element.

    `storage` is the pool's element dtype, None for the model dtype;
    `max_value` the largest magnitude a quantized format stores (None: not
    quantized, no scales); `bits` the bits per channel of an N-bit page
    format (packed rows, a `QuantKVCache`), None for element formats.
    """

    name: str
    storage: torch.dtype | None
    max_value: float | None = None
    bits: int | None = None

    @property
    def quantized(self) -> bool:
        """Whether values are stored scaled and saturated (`KVScales` apply)."""
        return self.max_value is not None

    def storage_dtype(self, model_dtype: torch.dtype) -> torch.dtype:
        """The pool's element dtype for a model running in `model_dtype`."""
        return self.storage if self.storage is not None else model_dtype


_FORMATS = {
    "auto": KVFormat("auto", None),
    "fp8_e4m3": KVFormat("fp8_e4m3", torch.float8_e4m3fn, FP8_E4M3_MAX),
    "int4": KVFormat("int4", torch.uint8, bits=4),
    "int3": KVFormat("int3", torch.uint8, bits=3),
}


def kv_format(kv_dtype: object) -> KVFormat:
    """The `KVFormat` of a `kv_dtype` argument: None / "auto", "fp8_e4m3", "int4", "int3"."""
    if isinstance(kv_dtype, KVFormat):
        return kv_dtype
    if kv_dtype is None:
        kv_dtype = "auto"
    if not isinstance(kv_dtype, str) or kv_dtype not in _FORMATS:
        raise ValueError(f"kv_dtype must be one of {', '.join(KV_DTYPES)} (or None for auto), "
                         f"got {kv_dtype!r}")
    return _FORMATS[kv_dtype]


class KVScales:
    """Per-layer dequantization scales of a quantized pool: value = stored * scale.

    `k[l]` and `v[l]` are Python floats (1.0 until calibrated), read by the
    writers and by the attention backends at every call, so kernels captured
    in a CUDA graph take the values current at capture: set them before.
    """

    def __init__(self, num_layers: int) -> None:
        self.k: list[float] = [1.0] * num_layers
        self.v: list[float] = [1.0] * num_layers

    def set(self, k: Sequence[float], v: Sequence[float]) -> None:
        """Replace every layer's scales (positive finite floats, one per layer)."""
        for name, vals in (("k", k), ("v", v)):
            vals = [float(x) for x in vals]
            if len(vals) != len(self.k):
                raise ValueError(f"{name} scales: {len(vals)} values for {len(self.k)} layers")
            if not all(math.isfinite(x) and x > 0 for x in vals):
                raise ValueError(f"{name} scales must be positive and finite, got {vals}")
        self.k, self.v = [float(x) for x in k], [float(x) for x in v]

    def is_unit(self, layer: int) -> bool:
        """Both of `layer`'s scales are 1 (readers can skip the rescaling)."""
        return self.k[layer] == 1.0 and self.v[layer] == 1.0

    def __repr__(self) -> str:
        return f"KVScales(k={self.k}, v={self.v})"


def quantize(x: torch.Tensor, scale: float, dtype: torch.dtype = torch.float8_e4m3fn,
             max_value: float = FP8_E4M3_MAX) -> torch.Tensor:
    """`x / scale` saturated to +-`max_value`, rounded to nearest even into `dtype`.

    In float32, so a power-of-two scale adds no rounding of its own and the
    result equals the fused Triton writer's bit for bit. NaN stays NaN.
    """
    y = x.float() * (1.0 / scale)
    return y.clamp(-max_value, max_value).to(dtype)


def dequantize(x: torch.Tensor, scale: float) -> torch.Tensor:
    """float32 `x * scale` (the reference readers' view of stored values)."""
    y = x.float()
    return y * scale if scale != 1.0 else y


class KVCache:
    """Paged K/V storage for every layer in one allocation.

    `dtype` is the model dtype (of the K/V written and of the queries);
    `kv_dtype` picks the storage (`kv_format`); `storage_dtype` is the pool's
    element dtype, and `scales` its per-layer scales when quantized.
    """

    def __init__(
        self,
        num_layers: int,
        num_pages: int,
        page_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
        kv_dtype: str | KVFormat | None = None,
    ) -> None:
        num_layers = check_int("num_layers", num_layers)
        num_pages = check_int("num_pages", num_pages)
        page_size = check_int("page_size", page_size)
        num_kv_heads = check_int("num_kv_heads", num_kv_heads)
        head_dim = check_int("head_dim", head_dim)
        if check_dtype(dtype) is None:
            raise TypeError("dtype must be given (float32, float16 or bfloat16), got None")
        fmt = kv_format(kv_dtype)
        if fmt.bits is not None:
            raise ValueError(f"kv_dtype={fmt.name!r} pages are a QuantKVCache "
                             "(dendrite.model.kv_quant_cache.make_kv_cache builds either)")
        dtype, device = check_dtype(dtype), check_device(device)
        storage = fmt.storage_dtype(dtype)
        check_kv_size(
            num_pages,
            page_size,
            self.bytes_per_page(num_layers, page_size, num_kv_heads, head_dim, storage),
            device,
        )
        self.num_layers, self.num_pages, self.page_size = num_layers, num_pages, page_size
        self.num_kv_heads, self.head_dim = num_kv_heads, head_dim
        self.dtype, self.device = dtype, device
        self.format, self.storage_dtype = fmt, storage
        self.scales = KVScales(num_layers)
        self.k_mean: torch.Tensor | None = None  # [num_layers, Hkv, D] float32 (set_k_mean)
        # zeros, not empty: padded/unused slots are masked, but NaN garbage
        # times a zero attention weight would still be NaN.
        self.kv = torch.zeros(
            num_layers,
            2,
            num_pages,
            page_size,
            num_kv_heads,
            head_dim,
            dtype=storage,
            device=self.device,
        )

    @staticmethod
    def bytes_per_page(
        num_layers: int, page_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype
    ) -> int:
        """Bytes one page takes across all layers (K and V), `dtype` the storage dtype."""
        elem = torch.empty((), dtype=dtype).element_size()
        return num_layers * 2 * page_size * num_kv_heads * head_dim * elem

    @property
    def nbytes(self) -> int:
        """Bytes of the whole cache tensor."""
        return self.kv.numel() * self.kv.element_size()

    @property
    def bytes_per_token(self) -> int:
        """KV bytes one token takes across all layers (K and V)."""
        return self.nbytes // (self.num_pages * self.page_size)

    @property
    def quantized(self) -> bool:
        """Whether the pool stores scaled, saturated values (`scales` apply)."""
        return self.format.quantized

    def layer(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(K, V) caches of `layer`, each [num_pages, page_size, Hkv, D]."""
        return self.kv[layer, 0], self.kv[layer, 1]

    def set_k_mean(self, k_mean: torch.Tensor | None) -> None:
        """Set the vector subtracted from K before it is stored ([num_layers,
        Hkv, D], float32; None: nothing). Quantized pools only; set it before
        anything is written (and before CUDA graphs are captured)."""
        if k_mean is not None:
            if not self.format.quantized:
                raise ValueError("k_mean applies to quantized KV pools only")
            shape = (self.num_layers, self.num_kv_heads, self.head_dim)
            if tuple(k_mean.shape) != shape or not torch.isfinite(k_mean).all():
                raise ValueError(f"k_mean must be finite with shape {shape}, "
                                 f"got {tuple(k_mean.shape)}")
            k_mean = k_mean.to(device=self.device, dtype=torch.float32).contiguous()
        self.k_mean = k_mean

    def write_args(self, layer: int) -> dict[str, object]:
        """What a fused writer (`dendrite.kernels.rows.rope_write`) needs besides
        the caches: the layer's scales and k_mean row ([Hkv, D] or None)."""
        return {"k_scale": self.scales.k[layer], "v_scale": self.scales.v[layer],
                "k_mean": self.k_mean[layer] if self.k_mean is not None else None}

    def write(
        self, layer: int, slot_mapping: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> None:
        """Store the step's new K/V ([T, Hkv, D]) at their slots (quantized when
        the format is, K less `k_mean`)."""
        k_cache, v_cache = self.layer(layer)
        if self.format.quantized:
            m = self.format.max_value
            if self.k_mean is not None:  # (k rounded to the model dtype first, as stored)
                k = k.float() - self.k_mean[layer]
            k = quantize(k, self.scales.k[layer], self.storage_dtype, m)
            v = quantize(v, self.scales.v[layer], self.storage_dtype, m)
        if self.kv.element_size() == 1:  # as raw bytes: index kernels need not know fp8
            k_cache, v_cache, k, v = (t.view(torch.uint8) for t in (k_cache, v_cache, k, v))
        k_cache.view(-1, self.num_kv_heads, self.head_dim)[slot_mapping] = k
        v_cache.view(-1, self.num_kv_heads, self.head_dim)[slot_mapping] = v

    def copy_pages(self, copies: np.ndarray | torch.Tensor) -> None:
        """Execute copy-on-write rows `(src_page, dst_page, num_tokens)`.

        Copies the first `num_tokens` slots of `src` into `dst`, for all layers
        and both K and V, as one gather plus one scatter. Must run before the
        step's forward writes new tokens into `dst`. All sources are read
        before any destination is written, so rows may chain safely. Bytes
        are copied as they are: the scales are per layer, so a copied page
        needs none of its own.
        """
        idx = cow_slot_pairs(copies, self.num_pages, self.page_size, self.device)
        if idx is None:
            return
        # (as raw bytes: index kernels need not know the fp8 dtypes)
        kv = self.kv.view(torch.uint8) if self.kv.element_size() == 1 else self.kv
        flat = kv.view(self.num_layers, 2, -1, self.num_kv_heads, self.head_dim)
        flat[:, :, idx[1]] = flat[:, :, idx[0]]


def cow_slot_pairs(copies: np.ndarray | torch.Tensor, num_pages: int, page_size: int,
                   device: torch.device) -> torch.Tensor | None:
    """Copy-on-write rows `(src_page, dst_page, num_tokens)` as int64 [2, N]
    flat slot indices (sources, destinations) on `device`; None when no row
    copies anything. A row outside the pool is a ValueError naming the rows."""
    if isinstance(copies, torch.Tensor):
        copies = copies.detach().cpu().numpy()
    rows = np.asarray(copies, dtype=np.int64).reshape(-1, 3)
    rows = rows[rows[:, 2] > 0]
    if len(rows) == 0:
        return None
    src, dst, n = rows[:, 0], rows[:, 1], rows[:, 2]
    if (n > page_size).any() or (rows[:, :2] < 0).any() or (rows[:, :2] >= num_pages).any():
        raise ValueError(f"invalid copy-on-write rows {rows.tolist()} for "
                         f"{num_pages} pages of {page_size}")
    # Token offsets 0..n-1 of every row, without a per-row Python loop.
    offs = np.arange(n.sum()) - np.repeat(np.cumsum(n) - n, n)
    idx = torch.from_numpy(np.stack([np.repeat(src, n) * page_size + offs,
                                     np.repeat(dst, n) * page_size + offs]))
    return idx.to(device, non_blocking=True)
