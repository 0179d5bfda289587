"""Single-row matmul (`y = x @ W.T`) for single-stream decode, in Triton, with
the neighbouring elementwise work of a decoder layer fused in.

A decode step of one sequence reads every weight once for one token, so it
is as fast as the weights stream from memory. Two things keep cuBLAS from
that speed on a 1B model (measured on an H100, docs/benchmarks.md): its GEMV
reads the small projections (8-12 MB) at about half the copy bandwidth, and
between the matmuls sit RMSNorm, residual adds and SiLU*up, each its own
kernel of a few microseconds. This kernel

* gives each program a few whole rows of W (about 8 KB), unrolled over K so
  all of a program's loads are in flight at once, on a grid that covers every
  SM many times over;
* optionally applies, while loading x, the RMSNorm that precedes the matmul
  (`norm_weight`) or the SiLU(gate) * up that precedes the down projection
  (`glu`), and adds the residual stream to the result (`residual`).

Rounding follows the unfused torch ops step by step (normalize in float32,
round, scale by the norm weight in the model dtype; SiLU rounded before the
product; the matmul result rounded before the residual add), so the fused
path differs from the unfused one by float32 summation order only.

`gemv` is registered as the custom op `dendrite::gemv`, which torch.compile
treats as one opaque call. `supported` says when it applies.
"""

from __future__ import annotations

import torch

from dendrite.kernels import weight_scales
from dendrite.kernels.config import KernelConfig, triton_available

__all__ = ["gemv", "supported", "tile_for"]

_DTYPES = (torch.float16, torch.bfloat16)
_ALL = KernelConfig()


def supported(x: torch.Tensor, weight: torch.Tensor, glu: bool = False,
              kernels: KernelConfig = _ALL, scale: torch.Tensor | None = None,
              block: tuple[int, int] | None = None, width: int | None = None) -> bool:
    """True when `gemv(x, weight, glu=glu, scale=scale, block=block)` can run and
    `kernels.gemv` allows it: one CUDA row, fp16/bf16, Triton importable, the
    weight dense in x's dtype or (with `scale`) e4m3 in scale blocks the tile
    can follow (dendrite/kernels/weight_scales.py). `width`: x's row width
    when the row to multiply is not x itself (the model checks a layer's
    projections with its hidden states)."""
    width = x.shape[-1] if width is None else width
    if not (kernels.gemv and x.is_cuda and x.dtype in _DTYPES
            and x.dim() == 2 and x.shape[0] == 1
            and weight.dim() == 2 and weight.is_contiguous()
            and width == weight.shape[1] * (2 if glu else 1)
            and triton_available() and weight_scales.weight_fits(x, weight, scale, block)):
        return False
    if scale is None:
        return True
    n, k = weight.shape
    block_n, block_k, _ = tile_for(n, k, glu=glu, weight_bytes=1)
    return weight_scales.gemv_mode(n, k, block, block_n, block_k) is not None


def tile_for(n: int, k: int, norm: bool = False, glu: bool = False,
             weight_bytes: int = 2) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_K, num_warps) for W of shape [n, k] with `weight_bytes`
    per element (1: e4m3); depends on the shape only.

    From a sweep over 1-16 rows x 4/8 warps of the Llama-3.2-1B weight shapes
    on an H100 (benchmarks/bench_kernels_gpu.py, docs/benchmarks.md): about
    8 KB of W per program, 8 warps for matrices over 16 MB or with the RMSNorm
    prologue. The SiLU*up prologue recomputes SiLU over the whole row in every
    program, so it wants many rows per program (16 rows, 8 warps, was 15%
    faster than 1 row on the 2048 x 8192 down projection), while keeping at
    least 128 programs. K is taken in chunks of at most 2048 columns (a power
    of two for `tl.arange`).
    """
    block_k = min(1 << max(k - 1, 1).bit_length(), 2048)
    if glu:
        block_n = 1
        while block_n < 16 and n // (2 * block_n) >= 128:
            block_n *= 2
        return block_n, block_k, 8
    block_n = 1
    while block_n < 16 and (2 * block_n) * weight_bytes * k <= 8 * 1024:
        block_n *= 2
    return block_n, block_k, (8 if norm or n * k * weight_bytes > 16 << 20 else 4)


def _launch(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
            norm_weight: torch.Tensor | None, eps: float, glu: bool,
            residual: torch.Tensor | None, tile: tuple[int, int, int] | None = None,
            scale: torch.Tensor | None = None, block: tuple[int, int] = (0, 0)
            ) -> torch.Tensor:
    """Run the kernel; `tile` overrides `tile_for` (benchmarks); `scale` and
    `block`: the e4m3 weight's block scales."""
    import triton  # noqa: PLC0415

    from dendrite.kernels._gemv_triton import gemv_kernel  # noqa: PLC0415

    n, k = weight.shape
    x = x.contiguous()
    y = torch.empty((1, n), dtype=x.dtype, device=x.device)
    block_n, block_k, warps = tile or tile_for(n, k, norm_weight is not None, glu,
                                               1 if scale is not None else 2)
    mode, groups, group = 0, 1, block_k
    if scale is not None:
        plan = weight_scales.gemv_mode(n, k, block, block_n, block_k)
        if plan is None:
            raise ValueError(f"gemv: tile {block_n} x {block_k} cuts the scale blocks {block}")
        mode, groups, group = plan
    gemv_kernel[(triton.cdiv(n, block_n),)](
        x, weight, bias if bias is not None else x,
        norm_weight if norm_weight is not None else x,
        residual.contiguous() if residual is not None else y, y,
        scale if scale is not None else x, n, eps,
        scale.stride(0) if scale is not None else 0,
        K=k, HAS_BIAS=bias is not None, NORM=norm_weight is not None, GLU=glu,
        RESIDUAL=residual is not None, BLOCK_N=block_n, BLOCK_K=block_k,
        SCALES=mode, MX=scale is not None and scale.dtype == torch.uint8,
        SN=max(block[0], 1), SK=max(block[1], 1), G=groups, GROUP=group, num_warps=warps)
    return y


@torch.library.custom_op("dendrite::gemv", mutates_args=())
def _gemv_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
             norm_weight: torch.Tensor | None, eps: float, glu: bool,
             residual: torch.Tensor | None, scale: torch.Tensor | None,
             block_rows: int, block_cols: int) -> torch.Tensor:
    return _launch(x, weight, bias, norm_weight, eps, glu, residual, None, scale,
                   (block_rows, block_cols))


@_gemv_op.register_fake
def _(x, weight, bias, norm_weight, eps, glu, residual, scale, block_rows, block_cols):
    return x.new_empty((1, weight.shape[0]))


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
         norm_weight: torch.Tensor | None = None, eps: float = 1e-6, glu: bool = False,
         residual: torch.Tensor | None = None, scale: torch.Tensor | None = None,
         block: tuple[int, int] | None = None) -> torch.Tensor:
    """`[residual +] f(x) @ W.T [+ bias]` for one row x; needs `supported`.

    f is RMSNorm with `norm_weight` (and `eps`) when given, SiLU(gate) * up
    when `glu` (x is `[gate | up]`, twice weight's K), identity otherwise.
    W is `weight`, or with `scale` the e4m3 `weight` times its scale of each
    `block = (rows, cols)` block (float32 multipliers, or uint8 e8m0 exponents).
    """
    rows, cols = block if block is not None else (0, 0)
    return _gemv_op(x, weight, bias, norm_weight, float(eps), bool(glu), residual, scale,
                    int(rows), int(cols))
