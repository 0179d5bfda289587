"""FP8 weight formats: block-scaled e4m3 ("fp8") and MXFP8 ("mxfp8"), in torch.

A `QuantizedWeight` is a float8_e4m3fn matrix `data` [N, K] plus one scale per
block of `block = (rows, cols)` elements, in a grid `scale`
[ceil(N / rows), ceil(K / cols)]; the real weight is `data * scale` of its block.

* fp8: 128 x 128 blocks (DeepSeek-V3 / DeepGEMM / HF FineGrainedFP8), scales
  float32 `amax / 448` per block (448 is e4m3's largest finite value); with
  `search` (what quantizing at load uses), each block's scale is the multiple
  `c * amax / 448`, c one of `SCALE_SEARCH` (0.70 .. 1.00), whose round trip
  has the least squared error: clipping a block's few largest elements can
  cost less than the rounding of the rest (SmolLM2-135M: perplexity +1.82%
  against +2.11% with amax scales, benchmarks/study_fp8_weight_scales.py).
* mxfp8 (OCP Microscaling): 1 x 32 blocks along K, scales e8m0: a power of two
  `2^(e - 127)` stored as the uint8 `e` (255, NaN in the spec, is never
  written). The exponent is the smallest that keeps the block's amax within
  448 (round the scale up: no element saturates), not the spec's
  `floor(log2(amax)) - 8`, which clips the largest elements of a block.

Shapes that are not multiples of the block are quantized as if zero-padded:
the last row/column blocks are partial, their scales from the elements that
exist. Values are clamped to +-448 before the cast (torch turns an
out-of-range e4m3 cast into NaN). Fused projections (q|k|v, gate|up) are
row concatenations of per-projection weights (`cat_rows`); when a part's
rows do not end on a block boundary the scales become one row per weight row
(`block = (1, cols)`), the same values, so a fused weight always dequantizes
to its parts exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = [
    "FORMATS",
    "FP8",
    "FP8_BLOCK",
    "FP8_MAX",
    "MX_BLOCK",
    "QuantizedWeight",
    "SCALE_SEARCH",
    "cat_rows",
    "dequantize",
    "e8m0_decode",
    "fused_block",
    "quantize",
    "quantize_fp8",
    "quantize_mxfp8",
    "scale_grid",
]

FP8 = torch.float8_e4m3fn
#: e4m3's largest finite magnitude.
FP8_MAX = 448.0
#: (rows, cols) of one fp8 scale block.
FP8_BLOCK = (128, 128)
#: Multipliers of a block's `amax / 448` that `quantize_fp8(search=True)` tries,
#: largest first (a tie keeps the larger scale).
SCALE_SEARCH = tuple(round(1.0 - 0.01 * i, 2) for i in range(31))
#: Elements along K sharing one MXFP8 scale.
MX_BLOCK = 32
#: The weight formats, by the name `quantization=` takes.
FORMATS = ("fp8", "mxfp8")
# An all-zero block still needs a positive scale (its data are zeros either way).
_TINY = 1e-12


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class QuantizedWeight:
    """e4m3 `data` [N, K] and the scales of its `block` (rows, cols) grid."""

    data: torch.Tensor
    #: float32 multipliers (fp8) or uint8 e8m0 exponents (mxfp8),
    #: [ceil(N / block[0]), ceil(K / block[1])].
    scale: torch.Tensor
    block: tuple[int, int]

    def __post_init__(self) -> None:
        if self.data.dtype != FP8 or self.data.dim() != 2:
            raise ValueError(f"QuantizedWeight.data must be a 2-D {FP8} tensor, got "
                             f"{self.data.dtype} of shape {tuple(self.data.shape)}")
        if self.scale.dtype not in (torch.float32, torch.uint8):
            raise ValueError(f"QuantizedWeight.scale must be float32 (fp8) or uint8 e8m0 "
                             f"(mxfp8), got {self.scale.dtype}")
        n, k = self.data.shape
        want = (_cdiv(n, self.block[0]), _cdiv(k, self.block[1]))
        if tuple(self.scale.shape) != want:
            raise ValueError(f"QuantizedWeight.scale has shape {tuple(self.scale.shape)}, "
                             f"expected {want} for data {(n, k)} in blocks {self.block}")

    @property
    def format(self) -> str:
        """'mxfp8' (e8m0 scales) or 'fp8' (float32 scales)."""
        return "mxfp8" if self.scale.dtype == torch.uint8 else "fp8"

    @property
    def shape(self) -> tuple[int, int]:
        """(N, K) of the weight."""
        return tuple(self.data.shape)  # type: ignore[return-value]

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight [N, K] in `dtype` (computed in float32, rounded once)."""
        return dequantize(self, dtype)


def e8m0_decode(e: torch.Tensor) -> torch.Tensor:
    """uint8 e8m0 exponents -> float32 `2^(e - 127)` (exact)."""
    return torch.exp2(e.to(torch.float32) - 127.0)


def scale_grid(q: QuantizedWeight) -> torch.Tensor:
    """The float32 multiplier of every block [ceil(N / rows), ceil(K / cols)]."""
    return e8m0_decode(q.scale) if q.scale.dtype == torch.uint8 else q.scale


def _blocks(w: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """float32 w zero-padded to whole blocks, viewed [nb, rows, kb, cols]."""
    n, k = w.shape
    bn, bk = block
    nb, kb = _cdiv(n, bn), _cdiv(k, bk)
    wf = w.to(torch.float32)
    if nb * bn != n or kb * bk != k:
        wf = torch.nn.functional.pad(wf, (0, kb * bk - k, 0, nb * bn - n))
    return wf.view(nb, bn, kb, bk)


def _to_fp8(blocks: torch.Tensor, scale: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """blocks / scale (broadcast per block), clamped, cast to e4m3, unpadded to [n, k]."""
    q = (blocks / scale[:, None, :, None]).clamp_(-FP8_MAX, FP8_MAX).to(FP8)
    nb, bn, kb, bk = blocks.shape
    return q.view(nb * bn, kb * bk)[:n, :k].contiguous()


def _check_weight(w: torch.Tensor) -> None:
    if not isinstance(w, torch.Tensor) or w.dim() != 2 or not w.is_floating_point():
        got = (f"{w.dtype} tensor of shape {tuple(w.shape)}" if isinstance(w, torch.Tensor)
               else type(w).__name__)
        raise ValueError(f"weight to quantize must be a 2-D float tensor, got {got}")
    if w.dtype == FP8 or w.numel() == 0:
        raise ValueError(f"weight to quantize must be a non-empty float tensor wider than fp8, "
                         f"got {w.dtype} of shape {tuple(w.shape)}")


def _searched_scale(b: torch.Tensor, amax: torch.Tensor) -> torch.Tensor:
    """Per block of `b` [nb, rows, kb, cols], the scale `c * amax / 448` (c in
    SCALE_SEARCH) whose e4m3 round trip has the least squared error."""
    base = amax.clamp_min(_TINY) / FP8_MAX
    best, best_err = base, None
    for c in SCALE_SEARCH:
        s = base * c
        q = (b / s[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8).to(torch.float32)
        err = (q * s[:, None, :, None] - b).square().sum(dim=(1, 3))
        if best_err is None:
            best_err = err
            continue
        better = err < best_err
        best = torch.where(better, s, best)
        best_err = torch.where(better, err, best_err)
    return best


def quantize_fp8(w: torch.Tensor, block: tuple[int, int] = FP8_BLOCK,
                 search: bool = False) -> QuantizedWeight:
    """Block-scaled e4m3: scale = amax / 448 per `block` (float32); with `search`,
    the least-squared-error multiple of it from SCALE_SEARCH (module docstring)."""
    _check_weight(w)
    bn, bk = block
    if bn < 1 or bk < 1:
        raise ValueError(f"block must be two positive ints, got {block}")
    n, k = w.shape
    b = _blocks(w, (bn, bk))
    amax = b.abs().amax(dim=(1, 3))
    if not torch.isfinite(amax).all():
        raise ValueError("weight to quantize has inf or NaN values")
    scale = _searched_scale(b, amax) if search else amax.clamp_min(_TINY) / FP8_MAX
    return QuantizedWeight(_to_fp8(b, scale, n, k), scale.contiguous(), (bn, bk))


def quantize_mxfp8(w: torch.Tensor) -> QuantizedWeight:
    """MXFP8: one power-of-two scale per 32 elements along K (uint8 e8m0)."""
    _check_weight(w)
    n, k = w.shape
    b = _blocks(w, (1, MX_BLOCK))
    amax = b.abs().amax(dim=(1, 3))
    if not torch.isfinite(amax).all():
        raise ValueError("weight to quantize has inf or NaN values")
    # Smallest e with amax / 2^e <= 448: frexp gives amax / 448 = m * 2^x, m in
    # [0.5, 1), so e = x, or x - 1 when m is exactly 0.5 (a power of two).
    mant, ex = torch.frexp(amax.clamp_min(_TINY) / FP8_MAX)
    e = torch.where(mant == 0.5, ex - 1, ex).clamp_(-127, 127)
    scale = torch.exp2(e.to(torch.float32))
    q = _to_fp8(b, scale, n, k)
    return QuantizedWeight(q, (e + 127).to(torch.uint8).contiguous(), (1, MX_BLOCK))


def quantize(w: torch.Tensor, fmt: str) -> QuantizedWeight:
    """`quantize_fp8` (128 x 128 blocks, searched scales: how a load quantizes)
    or `quantize_mxfp8`, by format name."""
    if fmt == "fp8":
        return quantize_fp8(w, search=True)
    if fmt == "mxfp8":
        return quantize_mxfp8(w)
    raise ValueError(f"weight format must be one of {', '.join(FORMATS)}, got {fmt!r}")


def dequantize(q: QuantizedWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """`data * scale` of each element's block, [N, K] in `dtype`."""
    n, k = q.shape
    bn, bk = q.block
    s = scale_grid(q)
    s = s.repeat_interleave(bn, 0)[:n].repeat_interleave(bk, 1)[:, :k]
    return (q.data.to(torch.float32) * s).to(dtype)


def _row_scales(q: QuantizedWeight) -> torch.Tensor:
    """q's scales with one row per weight row [N, ceil(K / cols)]."""
    return q.scale.repeat_interleave(q.block[0], 0)[: q.shape[0]]


def fused_block(rows: list[int], blocks: list[tuple[int, int]]) -> tuple[int, int]:
    """The scale block of the row concatenation of parts with `rows` rows and
    `blocks` (same block columns): their block when they share it and every
    part but the last ends on a block boundary, else one scale row per weight row."""
    bn, bk = blocks[0]
    if all(tuple(b) == (bn, bk) for b in blocks) and all(r % bn == 0 for r in rows[:-1]):
        return (bn, bk)
    return (1, bk)


def cat_rows(parts: list[QuantizedWeight]) -> QuantizedWeight:
    """The row concatenation of `parts` (same K, format and block columns), in
    the block `fused_block` gives: the same values, so it dequantizes to the
    concatenation of the parts' dequantized weights."""
    if not parts:
        raise ValueError("cat_rows needs at least one part")
    first = parts[0]
    for p in parts[1:]:
        if p.shape[1] != first.shape[1] or p.scale.dtype != first.scale.dtype \
                or p.block[1] != first.block[1]:
            raise ValueError(f"cannot fuse quantized weights of shapes/blocks "
                             f"{[(q.shape, q.block, q.format) for q in parts]}")
    if len(parts) == 1:
        return first
    data = torch.cat([p.data for p in parts])
    block = fused_block([p.shape[0] for p in parts], [p.block for p in parts])
    if all(p.block == block for p in parts):
        return QuantizedWeight(data, torch.cat([p.scale for p in parts]), block)
    scale = torch.cat([_row_scales(p) for p in parts])
    return QuantizedWeight(data, scale.contiguous(), block)
