"""Triton kernel of `dendrite.kernels.skinny` (imported only where Triton is).

One program computes a [ROWS, BLOCK_N] tile of `x @ W.T` (two tiles, gate and
up, with the SiLU*up epilogue), streaming its BLOCK_N rows of W once through
a software-pipelined loop over K; the few rows of x come from L2. Rounding
follows the unfused torch ops (see skinny.py and `_precise.round_to`).
"""

import triton
import triton.language as tl

from dendrite.kernels._precise import precise_div, precise_exp, precise_rsqrt, round_to
from dendrite.kernels._weight_scales_triton import row_scales


@triton.jit
def _x_tile(x_ptr, nw_ptr, offs_m, m_ok, offs_k, rstd, K: tl.constexpr,
            NORM: tl.constexpr, EVEN_K: tl.constexpr, dt: tl.constexpr):
    """Rows of x for columns offs_k, RMSNorm applied (rounded as the module) if NORM."""
    if EVEN_K:
        xk = tl.load(x_ptr + offs_m[:, None] * K + offs_k[None, :], mask=m_ok[:, None],
                     other=0.0)
    else:
        xk = tl.load(x_ptr + offs_m[:, None] * K + offs_k[None, :],
                     mask=m_ok[:, None] & (offs_k < K)[None, :], other=0.0)
    if NORM:
        if EVEN_K:
            nw = tl.load(nw_ptr + offs_k).to(tl.float32)
        else:
            nw = tl.load(nw_ptr + offs_k, mask=offs_k < K, other=0.0).to(tl.float32)
        xn = round_to(xk.to(tl.float32) * rstd[:, None], dt)
        xk = (xn * nw[None, :]).to(dt)
    return xk


@triton.jit
def _epilogue(acc, acc_up, b_ptr, r_ptr, y_ptr, offs_m, m_ok, offs_n, n_ok, N,
              HAS_BIAS: tl.constexpr, GLU_OUT: tl.constexpr, RESIDUAL: tl.constexpr):
    dt = y_ptr.dtype.element_ty
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        if GLU_OUT:
            acc_up += tl.load(b_ptr + N + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    y = round_to(acc, dt)  # the matmul's own output, as torch rounds it
    if GLU_OUT:  # SiLU(gate) rounded, then the product with up, as the torch ops
        s = round_to(precise_div(y, 1.0 + precise_exp(-y)), dt)
        y = s * round_to(acc_up, dt)
    if RESIDUAL:
        y += tl.load(r_ptr + offs_m[:, None] * N + offs_n[None, :],
                     mask=m_ok[:, None] & n_ok[None, :], other=0.0).to(tl.float32)
    tl.store(y_ptr + offs_m[:, None] * N + offs_n[None, :], y.to(dt),
             mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def skinny_kernel(x_ptr, w_ptr, b_ptr, nw_ptr, r_ptr, y_ptr, ws_ptr, lock_ptr, s_ptr,
                  M, N, eps, s_stride,
                  K: tl.constexpr, HAS_BIAS: tl.constexpr, NORM: tl.constexpr,
                  GLU_OUT: tl.constexpr, RESIDUAL: tl.constexpr, EVEN_K: tl.constexpr,
                  ROWS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                  SPLIT: tl.constexpr, SWAP: tl.constexpr, SCALED: tl.constexpr,
                  MX: tl.constexpr, SN: tl.constexpr, SK: tl.constexpr):
    """Program (n, s) multiplies columns [s K/SPLIT, (s+1) K/SPLIT) of BLOCK_N rows
    of W. With SPLIT > 1 it stores its float32 partial tile; the last of the
    n-block's programs to arrive (a counter per n-block) adds the partials in
    split order, so the result does not depend on arrival order, and resets
    the counter for the next call. With SWAP the MMA computes (W x^T), whose
    larger side is BLOCK_N (Hopper's warpgroup MMA wants 64 there). With
    SCALED, W is e4m3 in (SN x SK) scale blocks and every BLOCK_K chunk lies
    inside one column of blocks: each chunk's MMA takes the e4m3 values
    (exact in bf16/fp16) and its tile is scaled per row of W before it is
    added to the accumulator."""
    dt = y_ptr.dtype.element_ty
    pid_n = tl.program_id(0)
    offs_m = tl.arange(0, ROWS)
    m_ok = offs_m < M
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    rstd = tl.zeros([ROWS], dtype=tl.float32)
    if NORM:  # RMSNorm statistics of each row of x (read from L2 by every program)
        sq = tl.zeros([ROWS, BLOCK_K], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            xk = tl.load(x_ptr + offs_m[:, None] * K + offs_k[None, :],
                         mask=m_ok[:, None] & (offs_k < K)[None, :], other=0.0).to(tl.float32)
            sq += xk * xk
        rstd = precise_rsqrt(tl.sum(sq, axis=1) / K + eps)
    if SWAP:
        acc = tl.zeros([BLOCK_N, ROWS], dtype=tl.float32)
        acc_up = tl.zeros([BLOCK_N, ROWS], dtype=tl.float32)
    else:
        acc = tl.zeros([ROWS, BLOCK_N], dtype=tl.float32)
        acc_up = tl.zeros([ROWS, BLOCK_N], dtype=tl.float32)
    w_rows = w_ptr + offs_n[:, None] * K
    # With GLU_OUT, W is [gate | up] stacked along N: up row n is gate row n + N.
    w_up_rows = w_ptr + (offs_n + N)[:, None] * K
    k_begin = tl.program_id(1) * (K // SPLIT)
    for k_rel in range(0, K // SPLIT, BLOCK_K):
        offs_k = k_begin + k_rel + tl.arange(0, BLOCK_K)
        if EVEN_K:
            w_mask = n_ok[:, None]
        else:
            w_mask = n_ok[:, None] & (offs_k < K)[None, :]
        w = tl.load(w_rows + offs_k[None, :], mask=w_mask, other=0.0,
                    eviction_policy="evict_first")
        if GLU_OUT:
            w_up = tl.load(w_up_rows + offs_k[None, :], mask=w_mask, other=0.0,
                           eviction_policy="evict_first")
        xk = _x_tile(x_ptr, nw_ptr, offs_m, m_ok, offs_k, rstd, K, NORM, EVEN_K, dt)
        # (Written out per SWAP: a helper returning either orientation does not
        # compile, Triton unifies the shapes of both returns.)
        if SCALED and SWAP:
            k0 = k_begin + k_rel
            s = row_scales(s_ptr, offs_n, n_ok, k0, s_stride, SN, SK, MX)
            acc += tl.dot(w.to(dt), tl.trans(xk)) * s[:, None]
            if GLU_OUT:
                s_up = row_scales(s_ptr, offs_n + N, n_ok, k0, s_stride, SN, SK, MX)
                acc_up += tl.dot(w_up.to(dt), tl.trans(xk)) * s_up[:, None]
        elif SCALED:
            k0 = k_begin + k_rel
            s = row_scales(s_ptr, offs_n, n_ok, k0, s_stride, SN, SK, MX)
            acc += tl.dot(xk, tl.trans(w.to(dt))) * s[None, :]
            if GLU_OUT:
                s_up = row_scales(s_ptr, offs_n + N, n_ok, k0, s_stride, SN, SK, MX)
                acc_up += tl.dot(xk, tl.trans(w_up.to(dt))) * s_up[None, :]
        elif SWAP:
            acc = tl.dot(w, tl.trans(xk), acc)
            if GLU_OUT:
                acc_up = tl.dot(w_up, tl.trans(xk), acc_up)
        else:
            acc = tl.dot(xk, tl.trans(w), acc)
            if GLU_OUT:
                acc_up = tl.dot(xk, tl.trans(w_up), acc_up)
    if SWAP:
        acc = tl.trans(acc)
        acc_up = tl.trans(acc_up)
    if SPLIT == 1:
        _epilogue(acc, acc_up, b_ptr, r_ptr, y_ptr, offs_m, m_ok, offs_n, n_ok, N,
                  HAS_BIAS, GLU_OUT, RESIDUAL)
    else:
        # Partial tiles: ws[s, half, row, n] (half 1 is up, with GLU_OUT).
        tile = offs_m[:, None] * N + offs_n[None, :]
        ok = m_ok[:, None] & n_ok[None, :]
        half = ROWS * N
        mine = ws_ptr + tl.program_id(1) * 2 * half
        tl.store(mine + tile, acc, mask=ok)
        if GLU_OUT:
            tl.store(mine + half + tile, acc_up, mask=ok)
        if tl.atomic_add(lock_ptr + pid_n, 1, sem="acq_rel") == SPLIT - 1:
            acc = tl.zeros([ROWS, BLOCK_N], dtype=tl.float32)
            acc_up = tl.zeros([ROWS, BLOCK_N], dtype=tl.float32)
            for s in tl.static_range(SPLIT):
                part = ws_ptr + s * 2 * half
                acc += tl.load(part + tile, mask=ok, other=0.0, cache_modifier=".cg")
                if GLU_OUT:
                    acc_up += tl.load(part + half + tile, mask=ok, other=0.0,
                                      cache_modifier=".cg")
            _epilogue(acc, acc_up, b_ptr, r_ptr, y_ptr, offs_m, m_ok, offs_n, n_ok, N,
                      HAS_BIAS, GLU_OUT, RESIDUAL)
            tl.atomic_xchg(lock_ptr + pid_n, 0)
