"""Triton helpers that round like torch's CUDA kernels (imported only where Triton is).

torch's elementwise CUDA kernels call CUDA's `logf`, `expf`, `rsqrtf` and
IEEE division; Triton's `tl.log` / `tl.exp` / `/` may lower to faster
approximations. Kernels that must give torch's bits use these libdevice
versions.

`round_to(x, dtype)` rounds a float32 value to fp16/bf16 and back, as a torch
op rounds its result. A plain `x.to(dt).to(tl.float32)` is not enough: the
compiler may drop the round trip and fuse the product into the next add
(measured: a quarter of RoPE outputs one unit off on an H100), so the
conversion is an inline PTX `cvt.rn`, which nothing folds.

Triton's CPU interpreter (TRITON_INTERPRET=1) has neither libdevice nor PTX,
so there these fall back to the plain `tl` operations.
"""

import os

import triton
import triton.language as tl
from triton.language.extra import libdevice

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"

if INTERPRETED:
    @triton.jit
    def precise_log(x):
        return tl.log(x)

    @triton.jit
    def precise_exp(x):
        return tl.exp(x)

    @triton.jit
    def precise_rsqrt(x):
        return tl.rsqrt(x)

    @triton.jit
    def precise_div(a, b):
        return a / b

    @triton.jit
    def round_to(x, dt: tl.constexpr):
        return x.to(dt).to(tl.float32)
else:
    @triton.jit
    def precise_log(x):
        return libdevice.log(x)

    @triton.jit
    def precise_exp(x):
        return libdevice.exp(x)

    @triton.jit
    def precise_rsqrt(x):
        return libdevice.rsqrt(x)

    @triton.jit
    def precise_div(a, b):
        return libdevice.div_rn(a, b)

    @triton.jit
    def round_to(x, dt: tl.constexpr):
        if dt == tl.bfloat16:
            y = tl.inline_asm_elementwise("cvt.rn.bf16.f32 $0, $1;", "=h,r", [x],
                                          dtype=tl.bfloat16, is_pure=True, pack=1)
        else:
            y = tl.inline_asm_elementwise("cvt.rn.f16.f32 $0, $1;", "=h,r", [x],
                                          dtype=tl.float16, is_pure=True, pack=1)
        return y.to(tl.float32)
