"""Matmul with FP8 block-scaled weights (`y = x @ dequant(W).T`), in Triton.

The weight stays in memory as float8_e4m3fn [N, K] plus one scale per block
of `block = (rows, cols)` elements (dendrite/quant/formats.py): float32
multipliers for "fp8" (128 x 128 blocks), uint8 e8m0 exponents for "mxfp8"
(1 x 32). Decode reads each weight byte once per step, so halving the bytes
against bf16 is the whole point: the kernels read e4m3 and the scales and
dequantize in registers, never writing a bf16 copy.

* One row (single-stream decode): the GEMV kernel (dendrite/kernels/gemv.py)
  with its scale path, the same kernel a dense model's decode runs; the
  model's decode layers call it directly, with the fused norms and residual
  adds (dendrite/model/llama.py).
* 2-16 rows (a few decode branches): the few-row kernel (skinny.py) with its
  scaled MMA chunks and e4m3 tiles; the model's decode layers call it
  directly, fused like a dense layer's, and other callers reach it here.
* More rows (prefill, wide batches): `fp8_mm_kernel` here, tensor-core
  tiles of `dot(x, W_e4m3 as bf16/fp16) * scale` (e4m3 converts exactly),
  64 x 128 (16-row tiles when the few-row kernel cannot follow the blocks).

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

import torch

from dendrite.kernels import weight_scales
from dendrite.kernels.gemv import _launch as _gemv_launch
from dendrite.kernels.gemv import supported as _gemv_supported
from dendrite.kernels.skinny import MAX_ROWS as _SKINNY_ROWS
from dendrite.kernels.skinny import _launch as _skinny_launch
from dendrite.kernels.skinny import supported as _skinny_supported
from dendrite.kernels.config import triton_available

__all__ = ["fp8_matmul", "mm_tile", "supported"]

_DTYPES = (torch.float16, torch.bfloat16)


def mm_tile(m: int, n: int, k: int, sk: int) -> tuple[int, int, int, int, int] | None:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) of the many-row kernel,
    or None when no BLOCK_K of at least 16 lies inside the scale groups."""
    bk = weight_scales.chunk_inside_blocks(128, k, sk)
    if bk is None:
        return None
    if m <= 16:
        return 16, (16 if n <= 4096 else 32), bk, 4, 4
    return 64, 128, bk, 4, 3


def supported(x: torch.Tensor, data: torch.Tensor, scale: torch.Tensor,
              block: tuple[int, int]) -> bool:
    """True when `fp8_matmul(x, data, scale, block)` can run on x [M, K]."""
    m = x.shape[0] if x.dim() == 2 else 0
    if m == 1:
        return _gemv_supported(x, data, scale=scale, block=block)
    if 2 <= m <= _SKINNY_ROWS and _skinny_supported(x, data, scale=scale, block=block):
        return True
    if not (m >= 1 and x.is_cuda and x.dtype in _DTYPES and x.shape[1] == data.shape[1]
            and triton_available() and weight_scales.accepts(data, scale, block)):
        return False
    n, k = data.shape
    return mm_tile(m, n, k, block[1]) is not None


def _launch(x: torch.Tensor, data: torch.Tensor, scale: torch.Tensor,
            bias: torch.Tensor | None, block_rows: int, block_cols: int,
            tile: tuple[int, ...] | None = None) -> torch.Tensor:
    """Run the kernel for x's row count; `tile` overrides the kernel's own tile
    rule (benchmarks)."""
    x = x.contiguous()
    m, k = x.shape
    block = (block_rows, block_cols)
    if m == 1:
        return _gemv_launch(x, data, bias, None, 0.0, False, None, tile, scale, block)
    if m <= _SKINNY_ROWS and tile is None and _skinny_supported(x, data, scale=scale,
                                                                 block=block):
        return _skinny_launch(x, data, bias, None, 0.0, False, None, None, scale, block)
    import triton

    from dendrite.kernels._fp8_matmul_triton import fp8_mm_kernel

    n = data.shape[0]
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    bm, bn, bk, warps, stages = tile or mm_tile(m, n, k, block_cols)
    fp8_mm_kernel[(triton.cdiv(m, bm), triton.cdiv(n, bn))](
        x, data, scale, bias if bias is not None else y, y, m, n, k, scale.stride(0),
        SN=block_rows, SK=block_cols, MX=scale.dtype == torch.uint8,
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
