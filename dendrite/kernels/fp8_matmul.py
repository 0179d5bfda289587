"""Matmul with FP8 block-scaled weights (`y = x @ dequant(W).T`), in Triton.

The weight stays in memory as float8_e4m3fn [N, K] plus one scale per block
of `block = (rows, cols)` elements (dendrite/quant/formats.py): float32
multipliers for "fp8" (128 x 128 blocks), uint8 e8m0 exponents for "mxfp8"
(1 x 32). Decode reads each weight byte once per step, so halving the bytes
against bf16 is the whole point: the kernels read e4m3 and the scales and
dequantize in registers, never writing a bf16 copy.

* One row (single-stream decode): `fp8_gemv_kernel`, float32 products summed
  per scale group, then scaled.
* More rows (a few decode branches, prefill): `fp8_mm_kernel`, tensor-core
  tiles of `dot(x, W_e4m3 as bf16/fp16) * scale` (e4m3 converts exactly), a
  16-row tile for 2-16 rows, 64 x 128 tiles above.

This is Hopper's path for both formats: MX block scaling is native only on
Blackwell tensor cores (tcgen05), so here MXFP8 is decoded (`2^(e - 127)`)
in registers like fp8's float32 scales. Activations stay in the model dtype
(weight-only quantization); results differ from `F.linear(x, dequant(W))`
by float32 summation order and the bf16 rounding of the dequantized weight
that the reference applies and the kernels do not.

`supported` says when the kernels apply (CUDA, sm_89+, fp16/bf16 activations,
a scale block the tiles can follow, Triton importable); `fp8_matmul` is the
custom op `dendrite::fp8_matmul`. The torch reference and CPU path is
`dendrite.quant.linear.quant_linear`'s dequantize-then-`F.linear`.
"""

from __future__ import annotations

import functools

import torch

from dendrite.kernels.config import triton_available

__all__ = ["fp8_matmul", "gemv_tile", "mm_tile", "supported"]

_DTYPES = (torch.float16, torch.bfloat16)
_FP8 = torch.float8_e4m3fn
#: Programs wanted for a one-row matmul: two per SM of an H100 (132 SMs), so
#: enough loads are in flight to stream W at full bandwidth.
_GEMV_PROGRAMS = 256


def _pow2_at_least(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def gemv_tile(n: int, k: int, sk: int) -> tuple[int, int, int, int, int] | None:
    """(BLOCK_N, BLOCK_K, GROUP, G, num_warps) of the one-row kernel for W [n, k]
    with scale blocks `sk` columns wide; None when no chunk size fits the blocks.

    Chunks of 512 columns (K unrolled); a chunk either lies inside one scale
    group or holds G whole groups of GROUP columns. Rows per program: the most
    (up to 16) that still give about two programs per SM."""
    cap = _pow2_at_least(k)
    for bk in (512, 256, 128, 64, 32, 16):
        if bk > cap and bk > 16:
            continue
        if sk >= k or sk % bk == 0:
            group = bk
        elif bk % sk == 0:
            group = sk
        else:
            continue
        bn = 16
        while bn > 1 and -(-n // bn) < _GEMV_PROGRAMS:
            bn //= 2
        return bn, bk, group, bk // group, 4
    return None


def mm_tile(m: int, n: int, k: int, sk: int) -> tuple[int, int, int, int, int] | None:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) of the tensor-core kernel,
    or None when no BLOCK_K of at least 16 lies inside the scale groups."""
    bk = next((b for b in (128, 64, 32, 16) if sk >= k or sk % b == 0), None)
    if bk is None:
        return None
    if m <= 16:
        return 16, (16 if n <= 4096 else 32), bk, 4, 4
    return 64, 128, bk, 4, 3


@functools.cache
def _fp8_capable(index: int) -> bool:
    """e4m3 conversions in Triton need sm_89 (Ada) or newer."""
    return torch.cuda.get_device_capability(index) >= (8, 9)


def supported(x: torch.Tensor, data: torch.Tensor, scale: torch.Tensor,
              block: tuple[int, int]) -> bool:
    """True when `fp8_matmul(x, data, scale, block)` can run on x [M, K]."""
    if not (x.is_cuda and data.is_cuda and x.dtype in _DTYPES and x.dim() == 2
            and x.shape[0] >= 1 and data.dtype == _FP8 and data.dim() == 2
            and data.is_contiguous() and scale.is_contiguous()
            and scale.dtype in (torch.float32, torch.uint8)
            and x.shape[1] == data.shape[1] and triton_available()
            and _fp8_capable(x.device.index if x.device.index is not None
                             else torch.cuda.current_device())):
        return False
    n, k = data.shape
    if x.shape[0] == 1:
        return gemv_tile(n, k, block[1]) is not None
    return mm_tile(x.shape[0], n, k, block[1]) is not None


def _launch(x: torch.Tensor, data: torch.Tensor, scale: torch.Tensor,
            bias: torch.Tensor | None, block_rows: int, block_cols: int,
            tile: tuple[int, ...] | None = None) -> torch.Tensor:
    """Run the kernel for x's row count; `tile` overrides `gemv_tile`/`mm_tile` (benchmarks)."""
    import triton

    from dendrite.kernels._fp8_matmul_triton import (
        fp8_gemv_kernel,
        fp8_mm_kernel,
    )

    x = x.contiguous()
    m, k = x.shape
    n = data.shape[0]
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    mx = scale.dtype == torch.uint8
    b = bias if bias is not None else y
    if m == 1:
        bn, bk, group, g, warps = tile or gemv_tile(n, k, block_cols)
        fp8_gemv_kernel[(triton.cdiv(n, bn),)](
            x, data, scale, b, y, n, scale.stride(0), K=k, SN=block_rows, SK=block_cols,
            MX=mx, HAS_BIAS=bias is not None, BLOCK_N=bn, BLOCK_K=bk, GROUP=group, G=g,
            num_warps=warps)
        return y
    bm, bn, bk, warps, stages = tile or mm_tile(m, n, k, block_cols)
    fp8_mm_kernel[(triton.cdiv(m, bm), triton.cdiv(n, bn))](
        x, data, scale, b, y, m, n, k, scale.stride(0), SN=block_rows, SK=block_cols, MX=mx,
        HAS_BIAS=bias is not None, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps,
        num_stages=stages)
    return y


@torch.library.custom_op("dendrite::fp8_matmul", mutates_args=())
def _fp8_matmul_op(x: torch.Tensor, data: torch.Tensor, scale: torch.Tensor,
                   bias: torch.Tensor | None, block_rows: int, block_cols: int) -> torch.Tensor:
    return _launch(x, data, scale, bias, block_rows, block_cols)


@_fp8_matmul_op.register_fake
def _(x, data, scale, bias, block_rows, block_cols):
    return x.new_empty((x.shape[0], data.shape[0]))


def fp8_matmul(x: torch.Tensor, data: torch.Tensor, scale: torch.Tensor,
               block: tuple[int, int], bias: torch.Tensor | None = None) -> torch.Tensor:
    """`x @ dequant(data, scale).T [+ bias]` for x [M, K]; needs `supported`.

    `scale[i, j]` covers rows `i * block[0]` .. and columns `j * block[1]` ..
    of `data`; float32 multipliers or uint8 e8m0 exponents."""
    return _fp8_matmul_op(x, data, scale, bias, int(block[0]), int(block[1]))
