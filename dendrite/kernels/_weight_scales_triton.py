"""Triton helpers that apply FP8 block scales inside the matmul kernels.

A quantized weight is e4m3 [N, K] with one scale per (SN rows x SK columns)
block: float32 multipliers (fp8), or uint8 e8m0 exponents (MXFP8, the
multiplier `2^(e - 127)`); the scale of element (n, k) is
`s[(n // SN) * s_stride + k // SK]` (dendrite/quant/formats.py). The GEMV and
few-row kernels (gemv.py, skinny.py) load e4m3 bytes and these scales and
dequantize in registers; nothing is written back.
"""

import triton
import triton.language as tl


@triton.jit
def decode_scales(s, MX: tl.constexpr):
    """Stored scales -> float32 multipliers."""
    if MX:
        return tl.exp2(s.to(tl.float32) - 127.0)
    return s.to(tl.float32)


@triton.jit
def column_scales(s_ptr, row, offs_k, k_ok, s_stride, SN: tl.constexpr, SK: tl.constexpr,
                  MX: tl.constexpr):
    """[BLOCK_K] multipliers of row `row`'s columns offs_k (shared by every row in
    its row of scale blocks)."""
    s = tl.load(s_ptr + (row // SN) * s_stride + offs_k // SK, mask=k_ok, other=0)
    return decode_scales(s, MX)


@triton.jit
def row_scales(s_ptr, offs_n, n_ok, k0, s_stride, SN: tl.constexpr, SK: tl.constexpr,
               MX: tl.constexpr):
    """[BLOCK_N] multipliers of rows offs_n at column k0 (one per row: the
    caller's column chunk lies inside one column of scale blocks)."""
    s = tl.load(s_ptr + (offs_n // SN) * s_stride + k0 // SK, mask=n_ok, other=0)
    return decode_scales(s, MX)


@triton.jit
def scaled_group_sums(p, s_ptr, offs_n, n_ok, k0, s_stride, K: tl.constexpr,
                      SN: tl.constexpr, SK: tl.constexpr, MX: tl.constexpr,
                      BLOCK_N: tl.constexpr, G: tl.constexpr, GROUP: tl.constexpr):
    """Row sums of the products p [BLOCK_N, G * GROUP] of the columns from k0,
    each GROUP of columns (inside one scale block) summed, then scaled."""
    if G == 1:
        return tl.sum(p, axis=1) * row_scales(s_ptr, offs_n, n_ok, k0, s_stride, SN, SK, MX)
    part = tl.sum(tl.reshape(p, [BLOCK_N, G, GROUP]), axis=2)  # [BLOCK_N, G]
    offs_g = k0 + tl.arange(0, G) * GROUP
    s = tl.load(s_ptr + ((offs_n // SN) * s_stride)[:, None] + (offs_g // SK)[None, :],
                mask=n_ok[:, None] & (offs_g < K)[None, :], other=0)
    return tl.sum(part * decode_scales(s, MX), axis=1)
