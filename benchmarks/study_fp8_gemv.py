"""How an FP8 GEMV should turn e4m3 bytes into numbers (issue 17 study, GPU).

A one-row matmul over an e4m3 weight reads half the bytes of bf16, but each
byte must become a float before the multiply. Triton's `w.to(float32)` emits
conversion instructions (e4m3x2 -> f16x2, f16 -> f32), whose throughput per
SM is a fraction of the FMA's; if they, not memory, set the pace, the FP8
GEMV cannot reach bf16's bytes per second. This script times one GEMV kernel
(rows of W per program, K unrolled, scales folded into x as dendrite's GEMV
does for 128 x 128 blocks) with each way of decoding the byte:

* ``cvt``: `w.to(float32)` (the conversion instructions);
* ``f32bits``: integer ops only: the byte's exponent and mantissa bits moved
  into a float32's low exponent / high mantissa bits, which is the e4m3 value
  times 2^-120 (subnormals included, as float32 denormals); x is pre-scaled
  by 2^100 and the sum by 2^20;
* ``f16bits``: the bits moved into a float16 (value times 2^-8, exact), then
  `to(float32)`;
* ``bf16``: the dense bf16 weight (same kernel): the bytes-per-second bar.

For each: microseconds (CUDA events, median), GB/s of weight bytes, and the
largest difference from ``cvt``'s result (0 means the same numbers; a
weight block full of e4m3 subnormals checks that they survive).

    python3 benchmarks/study_fp8_gemv.py
"""

from __future__ import annotations

import statistics
import sys

import torch
import triton
import triton.language as tl


@triton.jit
def gemv(x_ptr, w_ptr, s_ptr, y_ptr, N, s_stride, K: tl.constexpr, BLOCK_N: tl.constexpr,
         BLOCK_K: tl.constexpr, MODE: tl.constexpr):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    for k0 in tl.static_range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        w = tl.load(w_ptr + offs_n[:, None] * K + offs_k[None, :], mask=n_ok[:, None],
                    other=0.0, eviction_policy="evict_first")
        xk = tl.load(x_ptr + offs_k).to(tl.float32)
        if MODE != 3:
            s = tl.load(s_ptr + (tl.program_id(0) * BLOCK_N // 128) * s_stride + offs_k // 128)
            xk = xk * s
        if MODE == 0:
            wf = w.to(tl.float32)
        elif MODE == 1:
            b = w.to(tl.uint8, bitcast=True).to(tl.uint32)
            wf = (((b & 0x7F) << 20) | ((b & 0x80) << 24)).to(tl.float32, bitcast=True)
            xk = xk * 1.2676506002282294e30  # 2^100
        elif MODE == 2:
            b = w.to(tl.uint8, bitcast=True).to(tl.uint16)
            wf = (((b & 0x7F) << 7) | ((b & 0x80) << 8)).to(tl.float16, bitcast=True)
            wf = wf.to(tl.float32)
            xk = xk * 256.0
        else:
            wf = w.to(tl.float32)
        acc += wf * xk[None, :]
    y = tl.sum(acc, axis=1)
    if MODE == 1:
        y = y * 1048576.0  # 2^20
    tl.store(y_ptr + offs_n, y.to(y_ptr.dtype.element_ty), mask=n_ok)


def run(mode: int, x, w, s, bn: int, warps: int):
    n, k = w.shape
    y = torch.empty((1, n), dtype=torch.float32, device=x.device)
    gemv[(triton.cdiv(n, bn),)](x, w, s, y, n, s.stride(0), K=k, BLOCK_N=bn,
                                BLOCK_K=min(k, 2048), MODE=mode, num_warps=warps)
    return y


def time_us(fn, copies: int, iters: int = 40) -> float:
    for i in range(3):
        fn(i % copies)
    ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
          for _ in range(iters)]
    for i, (a, b) in enumerate(ev):
        a.record()
        fn(i % copies)
        b.record()
    torch.cuda.synchronize()
    return 1e3 * statistics.median(a.elapsed_time(b) for a, b in ev)


def main() -> int:
    torch.manual_seed(0)
    dev = torch.device("cuda")
    names = {0: "cvt", 1: "f32bits", 2: "f16bits", 3: "bf16"}
    print("| shape | decode | BLOCK_N | warps | us | GB/s | max |diff| vs cvt |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for n, k in ((128256, 2048), (16384, 2048), (2048, 8192), (3072, 2048)):
        copies = max(1, (400 << 20) // (n * k))  # cycle past the 50 MB L2
        ws, ss, dense = [], [], []
        for c in range(copies):
            w = torch.randn(n, k, device=dev) * 0.02
            if c == 0:
                w[:128, :128] *= 1e-3  # a block of e4m3 subnormals (after its row's scale)
                w[0, 0] = 0.02 * 4
            grid = w.abs().reshape(-(-n // 128), min(n, 128), -(-k // 128), 128).amax((1, 3))
            s = (grid / 448.0).clamp_min(1e-12).contiguous()
            q = (w / s.repeat_interleave(128, 0)[:n].repeat_interleave(128, 1)[:, :k])
            ws.append(q.clamp(-448, 448).to(torch.float8_e4m3fn).contiguous())
            ss.append(s)
            dense.append(w.to(torch.bfloat16))
        x = torch.randn(1, k, device=dev).to(torch.bfloat16)
        ref = run(0, x, ws[0], ss[0], 8, 4)
        for mode in (0, 1, 2, 3):
            for bn in (4, 8, 16):
                for warps in (4, 8):
                    if mode == 3:
                        fn = lambda i, bn=bn, warps=warps: run(3, x, dense[i], ss[i], bn, warps)  # noqa: E731
                        nbytes = n * k * 2
                        diff = float("nan")
                    else:
                        fn = lambda i, mode=mode, bn=bn, warps=warps: run(mode, x, ws[i], ss[i], bn, warps)  # noqa: E731
                        nbytes = n * k
                        diff = float((fn(0) - ref).abs().max())
                    us = time_us(fn, copies)
                    print(f"| {n}x{k} | {names[mode]} | {bn} | {warps} | {us:.1f} | "
                          f"{nbytes / us / 1e3:.0f} | {diff:.3g} |", flush=True)
        del ws, ss, dense
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
