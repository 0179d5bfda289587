"""N-bit KV page format: a seeded orthogonal rotation, then 3- or 4-bit codes with fp16 scales.

Each K or V vector of one token and one KV head (D channels) is stored as one
row of `row_bytes` uint8:

* **Rotation.** The vector is first multiplied by a fixed orthogonal matrix
  `M` (`x -> x @ M`): a Hadamard matrix with seeded random signs when D is a
  power of two, else the Q of a seeded Gaussian's QR. One `M` per model
  (every layer and head). It spreads an outlier channel over all channels so
  that a min/max scale is not wasted on it. Attention never un-rotates K:
  `q.k = (q M).(k M)`, so it rotates q once; the output is rotated back once,
  `o = (sum_j p_j (v_j M)) M^T`.
* **Codes.** The rotated vector is cut into groups of `group_size` channels;
  each group gets `scale = (max - min) / (2^bits - 1)` and `min`, both stored
  as fp16, and codes `round((x - min) / scale)` in `[0, 2^bits)`.
  Dequantized: `min + code * scale`.
* **Packing.** Codes are stored as bit planes of width 4 (int4) or 2 + 1
  (int3). A plane of width `w` holds `8 / w` channels per byte: byte `i` of
  the plane holds channels `i, i + n, i + 2n, ...` (`n = D * w / 8` bytes in
  the plane), lowest bits first, so a kernel finds channel `c` at byte
  `c % n`, shift `w * (c // n)`.

Row layout: `[plane 0 | plane 1 ... | scales fp16 x G | mins fp16 x G]`, with
`G = D / group_size` groups: `row_bytes = D * bits / 8 + 4 G`. Values beyond
fp16's range (|x| > 65504 after rotation) are clamped.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["KV_QUANT_BITS", "KVQuantFormat", "kv_quant_format", "rotation_matrix"]

#: kv_dtype names of the N-bit formats and their bits per channel.
KV_QUANT_BITS = {"int4": 4, "int3": 3}

#: Bit-plane widths of each bit count, lowest code bits first.
_PLANES = {4: (4,), 3: (2, 1)}

_FP16_MAX = 65504.0


@dataclass(frozen=True)
class KVQuantFormat:
    """One N-bit page format: `bits` per channel, `head_dim` channels, one
    fp16 scale and min per `group_size` channels (default: the whole head)."""

    bits: int
    head_dim: int
    group_size: int | None = None

    def __post_init__(self) -> None:
        if self.bits not in _PLANES:
            raise ValueError(f"bits must be 3 or 4, got {self.bits!r}")
        if not isinstance(self.head_dim, int) or self.head_dim < 8 or self.head_dim % 8:
            raise ValueError(f"head_dim must be a multiple of 8 (>= 8), got {self.head_dim!r}")
        g = self.group_size if self.group_size is not None else self.head_dim
        if not isinstance(g, int) or g < 1 or self.head_dim % g:
            raise ValueError(
                f"group_size must divide head_dim={self.head_dim}, got {self.group_size!r}"
            )
        object.__setattr__(self, "group_size", g)

    @property
    def planes(self) -> tuple[int, ...]:
        """Bit widths of the code planes, lowest code bits first."""
        return _PLANES[self.bits]

    @property
    def num_groups(self) -> int:
        """Scale/min pairs per row."""
        return self.head_dim // self.group_size

    @property
    def code_bytes(self) -> int:
        """Bytes of the packed codes of one row."""
        return self.head_dim * self.bits // 8

    @property
    def row_bytes(self) -> int:
        """Bytes of one row (one token, one KV head, K or V): codes + fp16 scales and mins."""
        return self.code_bytes + 4 * self.num_groups

    def bytes_per_token(self, num_layers: int, num_kv_heads: int) -> int:
        """KV bytes of one token across all layers, K and V, scales included."""
        return num_layers * 2 * num_kv_heads * self.row_bytes

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        """Rotated vectors float [..., D] -> packed rows uint8 [..., row_bytes]."""
        d, g = self.head_dim, self.group_size
        if x.shape[-1] != d:
            raise ValueError(f"last dim must be head_dim={d}, got shape {tuple(x.shape)}")
        lead = x.shape[:-1]
        xg = x.float().clamp(-_FP16_MAX, _FP16_MAX).reshape(*lead, self.num_groups, g)
        lo, hi = xg.amin(-1), xg.amax(-1)
        levels = (1 << self.bits) - 1
        scale = ((hi - lo) / levels).to(torch.float16)
        # A constant group: every code 0, min carries the value; avoid 0/0.
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        lo = lo.to(torch.float16)
        # Codes from the fp16-rounded scale and min, so decoding matches.
        codes = ((xg - lo.float()[..., None]) / scale.float()[..., None]).round()
        codes = codes.clamp_(0, levels).to(torch.uint8).reshape(*lead, d)
        parts, shift = [], 0
        for w in self.planes:
            per = 8 // w
            n = d // per
            bits = (codes >> shift) & ((1 << w) - 1)
            packed = torch.zeros(*lead, n, dtype=torch.uint8, device=x.device)
            for i in range(per):
                packed |= bits[..., i * n : (i + 1) * n] << (w * i)
            parts.append(packed)
            shift += w
        parts.append(scale.view(torch.uint8).reshape(*lead, 2 * self.num_groups))
        parts.append(lo.view(torch.uint8).reshape(*lead, 2 * self.num_groups))
        return torch.cat(parts, dim=-1)

    def codes(self, rows: torch.Tensor) -> torch.Tensor:
        """Packed rows uint8 [..., row_bytes] -> integer codes uint8 [..., D]."""
        d = self.head_dim
        lead = rows.shape[:-1]
        out = torch.zeros(*lead, d, dtype=torch.uint8, device=rows.device)
        start, shift = 0, 0
        for w in self.planes:
            per = 8 // w
            n = d // per
            plane = rows[..., start : start + n]
            mask = (1 << w) - 1
            for i in range(per):
                out[..., i * n : (i + 1) * n] |= ((plane >> (w * i)) & mask) << shift
            start += n
            shift += w
        return out

    def scales(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Packed rows -> (scale, min), float32 [..., num_groups] each."""
        cb, ng = self.code_bytes, self.num_groups
        lead = rows.shape[:-1]
        tail = rows[..., cb:].contiguous().view(torch.float16).float()
        return tail[..., :ng].reshape(*lead, ng), tail[..., ng:].reshape(*lead, ng)

    def dequantize(self, rows: torch.Tensor) -> torch.Tensor:
        """Packed rows uint8 [..., row_bytes] -> rotated vectors float32 [..., D]."""
        if rows.dtype != torch.uint8 or rows.shape[-1] != self.row_bytes:
            raise ValueError(
                f"rows must be uint8 [..., {self.row_bytes}], got {rows.dtype} {tuple(rows.shape)}"
            )
        lead = rows.shape[:-1]
        scale, lo = self.scales(rows)
        codes = self.codes(rows).float().reshape(*lead, self.num_groups, self.group_size)
        return (codes * scale[..., None] + lo[..., None]).reshape(*lead, self.head_dim)


def kv_quant_format(kv_dtype: str, head_dim: int, group_size: int | None = None) -> KVQuantFormat:
    """The format a `kv_dtype` name ("int4", "int3") stands for, at `head_dim`."""
    if kv_dtype not in KV_QUANT_BITS:
        raise ValueError(f"kv_dtype must be one of {sorted(KV_QUANT_BITS)}, got {kv_dtype!r}")
    return KVQuantFormat(KV_QUANT_BITS[kv_dtype], head_dim, group_size)


def rotation_matrix(head_dim: int, seed: int = 0) -> torch.Tensor:
    """The seeded orthogonal float32 [D, D] matrix `M` of the format (`x -> x @ M`).

    A power-of-two D gets `diag(s) H / sqrt(D)` (Sylvester Hadamard `H`,
    random signs `s`); any other D the Q factor of a seeded Gaussian matrix.
    Built on the CPU generator, so every device and run gets the same matrix.
    """
    if not isinstance(head_dim, int) or head_dim < 1:
        raise ValueError(f"head_dim must be a positive int, got {head_dim!r}")
    gen = torch.Generator().manual_seed(seed)
    if head_dim & (head_dim - 1) == 0:
        h = torch.ones(1, 1, dtype=torch.float64)
        while h.shape[0] < head_dim:
            h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
        signs = torch.randint(0, 2, (head_dim,), generator=gen).double() * 2 - 1
        m = signs[:, None] * h / math.sqrt(head_dim)
    else:
        a = torch.randn(head_dim, head_dim, generator=gen, dtype=torch.float64)
        q, r = torch.linalg.qr(a)
        m = q * torch.sign(torch.diagonal(r))[None, :]
    return m.float()
