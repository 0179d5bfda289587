"""Torch reference attention over the paged KV cache (CPU and GPU).

Correctness first, float32 math throughout. `plan()` turns the page tables
into flat slot indices once per step; every layer reuses them:

* sequences with one new token (decode) are done together: their KV slots are
  padded to the longest one and masked, one batched einsum for all of them;
* sequences with several new tokens (prefill chunks) are done one by one with
  a causal mask aligned to the end of their KV (query `i` of a sequence with
  `q` new and `n` total tokens sees KV `j <= n - q + i`).

An optional per-layer sliding window `w` additionally hides KV `j <= pos - w`
(HF's convention: a token sees itself and the `w - 1` before it).

FP8 pages (dendrite/model/kv_cache.py): the gathered K/V rows are widened to
float32 and multiplied by the layer's scales (`kv_scales`) -- a dequantized
copy of the gathered rows, which is fine for the reference.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from dendrite.attention.base import AttentionMetadata

if TYPE_CHECKING:
    from dendrite.model.kv_cache import KVScales

__all__ = ["ReferenceBackend"]


@dataclass
class _Prefill:
    q_start: int
    q_len: int
    slots: torch.Tensor  # int64 [kv_len]


@dataclass
class _DecodeGroup:
    rows: torch.Tensor  # int64 [Bd], token rows of the decode sequences
    slots: torch.Tensor  # int64 [Bd, Lmax], padded with 0
    valid: torch.Tensor  # bool [Bd, Lmax]
    kv_lens: torch.Tensor  # int64 [Bd]


def _scaled(x: torch.Tensor, scale: float) -> torch.Tensor:
    return x * scale if scale != 1.0 else x


class ReferenceBackend:
    """AttentionBackend in plain torch; any dtype, any device.

    `kv_scales`: the pool's `KVScales` when it stores scaled values (FP8);
    None reads the caches as they are.
    """

    name = "reference"

    def __init__(
        self,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        page_size: int = 16,
        sm_scale: float | None = None,
        sliding_windows: Sequence[int | None] | None = None,
        kv_scales: KVScales | None = None,
    ) -> None:
        if num_heads % num_kv_heads:
            raise ValueError(
                f"num_heads={num_heads} is not a multiple of num_kv_heads={num_kv_heads}"
            )
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.page_size = page_size
        self.sm_scale = sm_scale if sm_scale is not None else 1.0 / math.sqrt(head_dim)
        self.sliding_windows = list(sliding_windows) if sliding_windows is not None else None
        self.kv_scales = kv_scales
        self._prefills: list[_Prefill] = []
        self._decode: _DecodeGroup | None = None
        self._planned = False

    def plan(self, meta: AttentionMetadata) -> None:
        """Take the step's layout (sequence lengths, page tables) from `meta`."""
        if meta.host is not None:
            qo, kvp, lens = meta.host.qo_indptr, meta.host.kv_indptr, meta.host.kv_lens
        else:
            qo, kvp, lens = meta.qo_indptr.cpu(), meta.kv_indptr.cpu(), meta.kv_lens.cpu()
        qo, kvp, lens = qo.tolist(), kvp.tolist(), lens.tolist()
        dev, ps = meta.kv_indices.device, self.page_size
        offsets = torch.arange(ps, device=dev)

        def slots_of(b: int) -> torch.Tensor:
            pages = meta.kv_indices[kvp[b] : kvp[b + 1]].to(torch.int64)
            return (pages[:, None] * ps + offsets).reshape(-1)[: lens[b]]

        self._prefills = []
        dec_rows, dec_slots = [], []
        for b in range(len(lens)):
            q_len = qo[b + 1] - qo[b]
            if q_len == 1:
                dec_rows.append(qo[b])
                dec_slots.append(slots_of(b))
            elif q_len > 1:
                self._prefills.append(_Prefill(qo[b], q_len, slots_of(b)))
        self._decode = None
        if dec_rows:
            n = torch.tensor([len(s) for s in dec_slots], device=dev)
            pad = torch.nn.utils.rnn.pad_sequence(dec_slots, batch_first=True)
            valid = torch.arange(pad.shape[1], device=dev)[None, :] < n[:, None]
            self._decode = _DecodeGroup(torch.tensor(dec_rows, device=dev), pad, valid, n)
        self._planned = True

    def _gather(self, cache: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """float32 K or V [*slots.shape, Hkv, D] of `slots` (a subclass may decode
        another page format here)."""
        flat = cache.view(-1, self.num_kv_heads, self.head_dim)
        if flat.element_size() == 1:  # fp8: gather the bytes (index kernels need no fp8)
            return flat.view(torch.uint8)[slots].view(flat.dtype).float()
        return flat[slots].float()

    def _window(self, layer: int) -> int | None:
        return self.sliding_windows[layer] if self.sliding_windows is not None else None

    def forward(
        self, layer: int, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor
    ) -> torch.Tensor:
        """Attention output of layer `layer` for `q`, reading K/V from the paged caches."""
        if not self._planned:
            raise RuntimeError("ReferenceBackend.forward called before plan()")
        hkv, d = self.num_kv_heads, self.head_dim
        g = self.num_heads // hkv
        window = self._window(layer)
        ks = self.kv_scales.k[layer] if self.kv_scales is not None else 1.0
        vs = self.kv_scales.v[layer] if self.kv_scales is not None else 1.0
        out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        qf = q.float()

        if self._decode is not None:
            dg = self._decode
            qd = qf[dg.rows].view(-1, hkv, g, d)  # [Bd, Hkv, G, D]
            k, v = self._gather(k_cache, dg.slots), self._gather(v_cache, dg.slots)
            k, v = _scaled(k, ks), _scaled(v, vs)
            s = torch.einsum("bhgd,blhd->bhgl", qd, k) * self.sm_scale
            mask = dg.valid
            if window is not None:  # the query sits at kv_len - 1
                j = torch.arange(mask.shape[1], device=q.device)
                mask = mask & (j[None, :] > dg.kv_lens[:, None] - 1 - window)
            s = s.masked_fill(~mask[:, None, None, :], float("-inf"))
            o = torch.einsum("bhgl,blhd->bhgd", s.softmax(-1), v)
            out[dg.rows] = o.reshape(-1, self.num_heads, d)

        for p in self._prefills:
            n = p.slots.shape[0]
            qp = qf[p.q_start : p.q_start + p.q_len].view(p.q_len, hkv, g, d)
            k, v = self._gather(k_cache, p.slots), self._gather(v_cache, p.slots)
            k, v = _scaled(k, ks), _scaled(v, vs)
            s = torch.einsum("qhgd,khd->hgqk", qp, k) * self.sm_scale
            qpos = torch.arange(n - p.q_len, n, device=q.device)[:, None]
            kpos = torch.arange(n, device=q.device)[None, :]
            mask = kpos <= qpos
            if window is not None:
                mask = mask & (kpos > qpos - window)
            s = s.masked_fill(~mask, float("-inf"))
            o = torch.einsum("hgqk,khd->qhgd", s.softmax(-1), v)
            out[p.q_start : p.q_start + p.q_len] = o.reshape(p.q_len, self.num_heads, d)
        return out.to(q.dtype)
