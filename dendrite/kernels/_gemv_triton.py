"""Triton kernel of `dendrite.kernels.gemv` (imported only where Triton is).

Each program takes BLOCK_N whole rows of W over all of K, unrolled in
BLOCK_K chunks so its loads are in flight together, and multiplies them with
the one row of x in float32, after the optional RMSNorm or SiLU*up prologue
(rounded as the torch ops, see gemv.py). With SCALES, W is e4m3 in block
scales (dendrite/kernels/_weight_scales_triton.py).
"""

import triton
import triton.language as tl

from dendrite.kernels._weight_scales_triton import column_scales, scaled_group_sums


@triton.jit
def gemv_kernel(x_ptr, w_ptr, b_ptr, nw_ptr, r_ptr, y_ptr, s_ptr, N, eps, s_stride,
                K: tl.constexpr, HAS_BIAS: tl.constexpr, NORM: tl.constexpr,
                GLU: tl.constexpr, RESIDUAL: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                SCALES: tl.constexpr, MX: tl.constexpr, SN: tl.constexpr,
                SK: tl.constexpr, G: tl.constexpr, GROUP: tl.constexpr):
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
    acc_rows = tl.zeros([BLOCK_N], dtype=tl.float32)  # SCALES == 2: scaled group sums
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
        if SCALES == 2:
            # Scales vary along the program's rows (e.g. MXFP8's 1 x 32
            # blocks): sum each GROUP of products, then scale the sums.
            p = w.to(tl.float32) * xk[None, :]
            acc_rows += scaled_group_sums(p, s_ptr, offs_n, n_ok, k0, s_stride, K,
                                          SN, SK, MX, BLOCK_N, G, GROUP)
        else:
            if SCALES == 1:
                # The program's rows lie in one row of scale blocks, so the
                # scales depend on the column only: fold them into x.
                xk *= column_scales(s_ptr, tl.program_id(0) * BLOCK_N, offs_k, k_ok,
                                    s_stride, SN, SK, MX)
            acc += w.to(tl.float32) * xk[None, :]
    y = tl.sum(acc, axis=1) + acc_rows
    if HAS_BIAS:
        y += tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)
    if RESIDUAL:
        y = y.to(dt).to(tl.float32) + tl.load(r_ptr + offs_n, mask=n_ok,
                                              other=0.0).to(tl.float32)
    tl.store(y_ptr + offs_n, y.to(dt), mask=n_ok)
