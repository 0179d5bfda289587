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

from dendrite.kernels.config import KernelConfig, triton_available

__all__ = ["gemv", "supported", "tile_for"]

_DTYPES = (torch.float16, torch.bfloat16)
_ALL = KernelConfig()


def supported(x: torch.Tensor, weight: torch.Tensor, glu: bool = False,
              kernels: KernelConfig = _ALL) -> bool:
    """True when `gemv(x, weight, glu=glu)` can run and `kernels.gemv` allows it:
    one CUDA row, fp16/bf16, Triton importable."""
    return (kernels.gemv and x.is_cuda and x.dtype in _DTYPES and weight.dtype == x.dtype
            and x.dim() == 2 and x.shape[0] == 1
            and weight.dim() == 2 and weight.is_contiguous()
            and x.shape[1] == weight.shape[1] * (2 if glu else 1)
            and triton_available())


def tile_for(n: int, k: int, norm: bool = False, glu: bool = False) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_K, num_warps) for W of shape [n, k]; depends on the shape only.

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
    while block_n < 16 and (2 * block_n) * 2 * k <= 8 * 1024:
        block_n *= 2
    return block_n, block_k, (8 if norm or n * k * 2 > 16 << 20 else 4)


_KERNEL = None


def _kernel():
    global _KERNEL
    if _KERNEL is not None:
        return _KERNEL
    import triton  # noqa: PLC0415
    import triton.language as tl  # noqa: PLC0415

    @triton.jit
    def gemv_kernel(x_ptr, w_ptr, b_ptr, nw_ptr, r_ptr, y_ptr, N, eps,
                    K: tl.constexpr, HAS_BIAS: tl.constexpr, NORM: tl.constexpr,
                    GLU: tl.constexpr, RESIDUAL: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        dt = y_ptr.dtype.element_ty
        offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N
        # The first chunk of W is requested before anything else, so its trip
        # from HBM overlaps the RMSNorm statistics below.
        offs_k = tl.arange(0, BLOCK_K)
        w_first = tl.load(w_ptr + offs_n[:, None] * K + offs_k[None, :],
                          mask=n_ok[:, None] & (offs_k < K)[None, :], other=0.0,
                          eviction_policy="evict_first")
        if NORM:  # RMSNorm statistics of x (from L2: every program reads the same row)
            sq = tl.zeros([BLOCK_K], dtype=tl.float32)
            for k0 in tl.static_range(0, K, BLOCK_K):
                offs_k = k0 + tl.arange(0, BLOCK_K)
                xk = tl.load(x_ptr + offs_k, mask=offs_k < K, other=0.0).to(tl.float32)
                sq += xk * xk
            rstd = tl.rsqrt(tl.sum(sq, axis=0) / K + eps)
        acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        for k0 in tl.static_range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_ok = offs_k < K
            if k0 == 0:
                w = w_first
            else:
                w = tl.load(w_ptr + offs_n[:, None] * K + offs_k[None, :],
                            mask=n_ok[:, None] & k_ok[None, :], other=0.0,
                            eviction_policy="evict_first")
            if GLU:  # x = [gate | up]: SiLU(gate) * up, each rounded like the torch ops
                g = tl.load(x_ptr + offs_k, mask=k_ok, other=0.0).to(tl.float32)
                u = tl.load(x_ptr + K + offs_k, mask=k_ok, other=0.0).to(tl.float32)
                xk = (g / (1.0 + tl.exp(-g))).to(dt).to(tl.float32)
                xk = (xk * u).to(dt).to(tl.float32)
            else:
                xk = tl.load(x_ptr + offs_k, mask=k_ok, other=0.0).to(tl.float32)
            if NORM:
                nw = tl.load(nw_ptr + offs_k, mask=k_ok, other=0.0).to(tl.float32)
                xk = (xk * rstd).to(dt).to(tl.float32)
                xk = (xk * nw).to(dt).to(tl.float32)
            acc += w.to(tl.float32) * xk[None, :]
        y = tl.sum(acc, axis=1)
        if HAS_BIAS:
            y += tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)
        if RESIDUAL:
            y = y.to(dt).to(tl.float32) + tl.load(r_ptr + offs_n, mask=n_ok,
                                                  other=0.0).to(tl.float32)
        tl.store(y_ptr + offs_n, y.to(dt), mask=n_ok)

    _KERNEL = (triton, gemv_kernel)
    return _KERNEL


def _launch(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
            norm_weight: torch.Tensor | None, eps: float, glu: bool,
            residual: torch.Tensor | None, tile: tuple[int, int, int] | None = None
            ) -> torch.Tensor:
    """Run the kernel; `tile` overrides `tile_for` (benchmarks)."""
    triton, kernel = _kernel()
    n, k = weight.shape
    x = x.contiguous()
    y = torch.empty((1, n), dtype=x.dtype, device=x.device)
    block_n, block_k, warps = tile or tile_for(n, k, norm_weight is not None, glu)
    kernel[(triton.cdiv(n, block_n),)](
        x, weight, bias if bias is not None else weight,
        norm_weight if norm_weight is not None else weight,
        residual.contiguous() if residual is not None else y, y, n, eps,
        K=k, HAS_BIAS=bias is not None, NORM=norm_weight is not None, GLU=glu,
        RESIDUAL=residual is not None, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps)
    return y


@torch.library.custom_op("dendrite::gemv", mutates_args=())
def _gemv_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
             norm_weight: torch.Tensor | None, eps: float, glu: bool,
             residual: torch.Tensor | None) -> torch.Tensor:
    return _launch(x, weight, bias, norm_weight, eps, glu, residual)


@_gemv_op.register_fake
def _(x, weight, bias, norm_weight, eps, glu, residual):
    return x.new_empty((1, weight.shape[0]))


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
         norm_weight: torch.Tensor | None = None, eps: float = 1e-6, glu: bool = False,
         residual: torch.Tensor | None = None) -> torch.Tensor:
    """`[residual +] f(x) @ weight.T [+ bias]` for one row x; needs `supported`.

    f is RMSNorm with `norm_weight` (and `eps`) when given, SiLU(gate) * up
    when `glu` (x is `[gate | up]`, twice weight's K), identity otherwise.
    """
    return _gemv_op(x, weight, bias, norm_weight, float(eps), bool(glu), residual)
