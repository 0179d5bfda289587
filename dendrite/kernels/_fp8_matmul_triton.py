"""Triton kernel of `dendrite.kernels.fp8_matmul` for many rows (imported only
where Triton is; one to 16 rows run the GEMV and few-row kernels).

The weight is float8_e4m3fn [N, K] with one scale per (SN rows x SK columns)
block, float32 (fp8) or uint8 e8m0 (MX: `2^(e - 127)`); the scale of element
(n, k) is `s[(n // SN) * s_stride + k // SK]`. `fp8_mm_kernel` computes
[BLOCK_M, BLOCK_N] tiles on the tensor cores: e4m3 converts to bf16/fp16
exactly, so each BLOCK_K slice (inside one scale group) is
`dot(x, W_e4m3) * s` with float32 accumulation; nothing is stored back.
"""

import triton
import triton.language as tl


@triton.jit
def fp8_mm_kernel(x_ptr, w_ptr, s_ptr, b_ptr, y_ptr, M, N, K, s_stride,
                  SN: tl.constexpr, SK: tl.constexpr, MX: tl.constexpr,
                  HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_K: tl.constexpr):
    """y = x @ dequant(W).T for x [M, K] (contiguous); every BLOCK_K slice lies
    inside one scale group (SK % BLOCK_K == 0, or SK >= K)."""
    dt = x_ptr.dtype.element_ty
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    n_ok = offs_n < N
    srow = (offs_n // SN) * s_stride
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < K
        xk = tl.load(x_ptr + offs_m[:, None] * K + offs_k[None, :],
                     mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptr + offs_n[:, None] * K + offs_k[None, :],
                    mask=n_ok[:, None] & k_ok[None, :], other=0.0)
        s = tl.load(s_ptr + srow + k0 // SK, mask=n_ok, other=0)
        if MX:
            s = tl.exp2(s.to(tl.float32) - 127.0)
        acc += tl.dot(xk, tl.trans(w.to(dt))) * s.to(tl.float32)[None, :]
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + offs_m[:, None] * N + offs_n[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])
