"""Few-row matmul (`y = x @ W.T` for 2-16 rows) for batched decode, in Triton,
with the elementwise work around a decoder layer's matmuls fused in.

A decode step of a few branches reads every weight once for a handful of
tokens: it is as fast as the weights stream from memory, like one row (the
single-row kernel is dendrite/kernels/gemv.py). cuBLAS reaches about 2.2 TB/s
there on an H100 (docs/benchmarks.md), and between its matmuls sit an
RMSNorm, a residual add and SiLU*up, each one more kernel. This kernel

* streams BLOCK_N rows of W per program through a pipelined loop over K and
  multiplies them with all rows of x on the tensor cores (x padded to 16
  rows, the smallest MMA tile); small matrices split K over several programs
  (more loads in flight), the last one to finish adding the partial tiles in
  a fixed order, so results are deterministic;
* optionally applies, while loading x, the RMSNorm that precedes the matmul
  (`norm_weight`), and adds the residual stream to the result (`residual`);
* with `glu_out`, computes the gate and up halves of a fused gate|up weight
  in the same program and writes SiLU(gate) * up, the down projection's
  input. (A SiLU prologue on the down projection, as the single-row kernel
  has, would recompute the SiLU of every row in every program: 16 rows of
  8192 in each of 128 programs.)

Rounding follows the unfused torch ops (the matmul output rounded to the
model dtype before the residual add or SiLU; RMSNorm normalized in float32,
rounded, then scaled by the weight), so results differ from them only by the
float32 summation order of the matmul and of the RMSNorm sum of squares.

`skinny` is the custom op `dendrite::skinny`, one opaque call to torch.compile.
"""

from __future__ import annotations

import torch

from dendrite.kernels import weight_scales
from dendrite.kernels.config import KernelConfig, triton_available

__all__ = ["MAX_ROWS", "skinny", "supported", "tile_for"]

MAX_ROWS = 16
_DTYPES = (torch.float16, torch.bfloat16)
_ALL = KernelConfig()


def supported(x: torch.Tensor, weight: torch.Tensor, glu_out: bool = False,
              kernels: KernelConfig = _ALL, scale: torch.Tensor | None = None,
              block: tuple[int, int] | None = None, width: int | None = None) -> bool:
    """True when `skinny(x, weight, glu_out=glu_out, scale=scale, block=block)` can
    run and `kernels.skinny` allows it: 2-16 CUDA rows, fp16/bf16, Triton
    importable, the weight dense in x's dtype or (with `scale`) e4m3 in scale
    blocks at least 16 columns wide (dendrite/kernels/weight_scales.py).
    `width`: x's row width when the rows to multiply are not x itself (the
    model checks a layer's projections with its hidden states).

    The model's fused decode layers take it for dense and e4m3 weights alike
    (an e4m3 layer with its own tiles, `tile_for(scaled=True)`); other e4m3
    projections reach it through `dendrite.kernels.fp8_matmul`."""
    width = x.shape[-1] if width is None else width
    if not (kernels.skinny and x.is_cuda and x.dtype in _DTYPES
            and x.dim() == 2 and 2 <= x.shape[0] <= MAX_ROWS
            and weight.dim() == 2 and weight.is_contiguous()
            and width == weight.shape[1]
            and (not glu_out or weight.shape[0] % 2 == 0)
            and triton_available() and weight_scales.weight_fits(x, weight, scale, block)):
        return False
    if scale is None:
        return True
    n, k = weight.shape
    block_k = tile_for(n // (2 if glu_out else 1), k, glu_out=glu_out, scaled=True)[1]
    return weight_scales.chunk_inside_blocks(block_k, k, block[1]) is not None


Tile = tuple[int, int, int, int, int, int]


def tile_for(n: int, k: int, norm: bool = False, glu_out: bool = False,
             scaled: bool = False) -> Tile:
    """(BLOCK_N, BLOCK_K, num_warps, num_stages, SPLIT, SWAP) for n outputs from K = k.

    From a sweep over 15 tiles of the Llama-3.2-1B layer matmuls at 16 rows
    on an H100 (benchmarks/bench_kernels_gpu.py --sections rows,
    docs/benchmarks.md): a long K over few outputs (the down projection)
    splits K four ways; the gate|up matmul with its SiLU epilogue puts W on
    the MMA's 64-wide side (SWAP) with 8 warps; other wide outputs (lm_head)
    take 64 rows of W per program; the rest 16 rows (32 with the RMSNorm,
    which then runs in half as many programs), K in chunks of 256.

    `scaled` (e4m3 weights, `--sections fp8rows`, 22 tiles, H100): a chunk
    must lie in one 128-column scale block, so a stage moves a quarter of a
    bf16 256-chunk's bytes; wider programs and split K keep enough loads in
    flight. The RMSNorm'd matmuls (q|k|v, gate|up with SiLU*up) take 64 rows
    of W and 8 warps unswapped (gate|up: 21.7 us vs 39.4 with the bf16 rule),
    a long K or a small square matrix (down, o) splits K four ways over 32
    rows, wide plain outputs take 32 rows unsplit.
    """
    if scaled:
        if k >= 4 * n:
            return 32, 128, 4, 4, 4, 0
        if norm or glu_out:
            return 64, 128, 8, 4, 1, 0
        if n >= 8192:
            return 32, 128, 4, 4, 1, 0
        return 32, 128, 4, 4, 4, 0
    if k >= 4 * n:
        return 32, 128, 4, 3, 4, 0
    if glu_out:
        return 64, 128, 8, 3, 1, 1
    if n >= 8192:
        return 64, 256, 4, 4, 1, 0
    return (32 if norm else 16), 256, 4, 4, 1, 0


_WORKSPACE: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def _workspace(device: torch.device, n: int, split: int, block_n: int
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 partial tiles [split, 2, 16, n] and zeroed per-n-block counters.

    Kept per shape for the life of the process: a CUDA graph captures their
    addresses, and the kernel leaves the counters at zero after every call.
    """
    key = (device, n, split, block_n)
    if key not in _WORKSPACE:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("skinny: split-K workspace first needed inside CUDA-graph "
                               f"capture (n={n}, split={split}); run the shape once eagerly")
        _WORKSPACE[key] = (
            torch.empty((split, 2, MAX_ROWS, n), dtype=torch.float32, device=device),
            torch.zeros(-(-n // block_n), dtype=torch.int32, device=device))
    return _WORKSPACE[key]


def _launch(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
            norm_weight: torch.Tensor | None, eps: float, glu_out: bool,
            residual: torch.Tensor | None,
            tile: Tile | None = None, scale: torch.Tensor | None = None,
            block: tuple[int, int] = (0, 0)) -> torch.Tensor:
    """Run the kernel; `tile` overrides `tile_for` (benchmarks); `scale` and
    `block`: the e4m3 weight's block scales."""
    import triton  # noqa: PLC0415

    from dendrite.kernels._skinny_triton import skinny_kernel  # noqa: PLC0415

    m, k = x.shape
    n = weight.shape[0] // 2 if glu_out else weight.shape[0]
    x = x.contiguous()
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    block_n, block_k, warps, stages, split, swap = tile or tile_for(
        n, k, norm_weight is not None, glu_out, scaled=scale is not None)
    if scale is not None:
        inside = weight_scales.chunk_inside_blocks(block_k, k, block[1])
        if inside is None:
            raise ValueError(f"skinny: no K chunk of 16 or more fits the scale blocks {block}")
        block_k = inside
    if k % (split * block_k):
        split = 1  # the K slices must be whole chunks
    ws, locks = _workspace(x.device, n, split, block_n) if split > 1 else (y, y)
    skinny_kernel[(triton.cdiv(n, block_n), split)](
        x, weight, bias if bias is not None else x,
        norm_weight if norm_weight is not None else x,
        residual.contiguous() if residual is not None else y, y, ws, locks,
        scale if scale is not None else x, m, n, eps,
        scale.stride(0) if scale is not None else 0,
        K=k, HAS_BIAS=bias is not None, NORM=norm_weight is not None, GLU_OUT=glu_out,
        RESIDUAL=residual is not None, EVEN_K=k % block_k == 0, ROWS=MAX_ROWS,
        BLOCK_N=block_n, BLOCK_K=block_k, SPLIT=split, SWAP=bool(swap),
        SCALED=scale is not None, MX=scale is not None and scale.dtype == torch.uint8,
        SN=max(block[0], 1), SK=max(block[1], 1), num_warps=warps, num_stages=stages)
    return y


@torch.library.custom_op("dendrite::skinny", mutates_args=())
def _skinny_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
               norm_weight: torch.Tensor | None, eps: float, glu_out: bool,
               residual: torch.Tensor | None, scale: torch.Tensor | None,
               block_rows: int, block_cols: int) -> torch.Tensor:
    return _launch(x, weight, bias, norm_weight, eps, glu_out, residual, None, scale,
                   (block_rows, block_cols))


@_skinny_op.register_fake
def _(x, weight, bias, norm_weight, eps, glu_out, residual, scale, block_rows, block_cols):
    return x.new_empty((x.shape[0], weight.shape[0] // (2 if glu_out else 1)))


def skinny(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
           norm_weight: torch.Tensor | None = None, eps: float = 1e-6, glu_out: bool = False,
           residual: torch.Tensor | None = None, scale: torch.Tensor | None = None,
           block: tuple[int, int] | None = None) -> torch.Tensor:
    """`[residual +] g(f(x) @ W.T [+ bias])` for 2-16 rows of x; needs `supported`.

    f is RMSNorm with `norm_weight` (and `eps`) when given, identity otherwise;
    g is SiLU(gate) * up over the two halves of the output when `glu_out`
    (weight is `[gate | up]`, the result half its width), identity otherwise.
    W is `weight`, or with `scale` the e4m3 `weight` times its scale of each
    `block = (rows, cols)` block (float32 multipliers, or uint8 e8m0 exponents).
    """
    rows, cols = block if block is not None else (0, 0)
    return _skinny_op(x, weight, bias, norm_weight, float(eps), bool(glu_out), residual,
                      scale, int(rows), int(cols))
