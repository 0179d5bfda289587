"""Triton kernels of `dendrite.kernels.rows` (imported only where Triton is).

Every kernel rounds to the model dtype where the torch ops it replaces do
(see rows.py, and `round_to` for why not with `.to()`), in float32 between.
"""

import triton
import triton.language as tl

from dendrite.kernels._precise import precise_div, precise_exp, precise_rsqrt, round_to


@triton.jit
def add_rms_norm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr, N, eps,
                        HAS_RES: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    dt = out_ptr.dtype.element_ty
    offs = tl.arange(0, BLOCK)
    ok = offs < N
    h = tl.load(x_ptr + row * N + offs, mask=ok, other=0.0).to(tl.float32)
    if HAS_RES:  # the residual add of the previous sublayer, rounded as torch's add
        h = round_to(h + tl.load(res_ptr + row * N + offs, mask=ok, other=0.0).to(tl.float32),
                     dt)
        tl.store(res_out_ptr + row * N + offs, h.to(dt), mask=ok)
    rstd = precise_rsqrt(tl.sum(h * h, axis=0) / N + eps)
    y = round_to(h * rstd, dt)
    w = tl.load(w_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * N + offs, (w * y).to(dt), mask=ok)


@triton.jit
def silu_mul_kernel(gu_ptr, out_ptr, inter, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < inter
    dt = out_ptr.dtype.element_ty
    g = tl.load(gu_ptr + row * 2 * inter + offs, mask=ok, other=0.0).to(tl.float32)
    u = tl.load(gu_ptr + row * 2 * inter + inter + offs, mask=ok, other=0.0).to(tl.float32)
    s = round_to(precise_div(g, 1.0 + precise_exp(-g)), dt)
    tl.store(out_ptr + row * inter + offs, (s * u).to(dt), mask=ok)


@triton.jit
def _store_kv(ptr, x, inv_scale, max_value, mask, QUANT: tl.constexpr):
    """Store `x` (float32 values of the model dtype) into a cache of the model
    dtype, or as FP8: x * inv_scale clamped to +-max_value (NaN kept), rounded
    to nearest even (KVCache.write's `quantize`)."""
    if QUANT:
        y = tl.clamp(x * inv_scale, -max_value, max_value, propagate_nan=tl.PropagateNan.ALL)
        tl.store(ptr, y.to(ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(ptr, x.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rope_store(src_ptr, dst_ptr, mean_ptr, c1, s1, c2, s2, heads, inv_scale, max_value,
                HALF: tl.constexpr, HBLOCK: tl.constexpr, QUANT: tl.constexpr,
                HAS_MEAN: tl.constexpr):
    """dst = src * cos + rotate_half(src) * sin for [heads, 2 HALF] rows, each
    product rounded to the dtype before the sum, as the torch expression
    (stored as FP8 with QUANT, less the float32 [heads, 2 HALF] rows at
    mean_ptr with HAS_MEAN, see `_store_kv`)."""
    dt = src_ptr.dtype.element_ty
    h = tl.arange(0, HBLOCK)[:, None]
    j = tl.arange(0, HALF)[None, :]
    ok = h < heads
    row = h * (2 * HALF)
    x1 = tl.load(src_ptr + row + j, mask=ok, other=0.0).to(tl.float32)
    x2 = tl.load(src_ptr + row + HALF + j, mask=ok, other=0.0).to(tl.float32)
    # rotate_half(x) = [-x2, x1]
    lo = round_to(x1 * c1, dt) + round_to(-x2 * s1, dt)
    hi = round_to(x2 * c2, dt) + round_to(x1 * s2, dt)
    if QUANT:  # quantize the value the model dtype holds, as KVCache.write does
        lo, hi = round_to(lo, dt), round_to(hi, dt)
        if HAS_MEAN:
            lo = lo - tl.load(mean_ptr + row + j, mask=ok, other=0.0)
            hi = hi - tl.load(mean_ptr + row + HALF + j, mask=ok, other=0.0)
    _store_kv(dst_ptr + row + j, lo, inv_scale, max_value, ok, QUANT)
    _store_kv(dst_ptr + row + HALF + j, hi, inv_scale, max_value, ok, QUANT)


@triton.jit
def rope_write_kernel(qkv_ptr, cos_ptr, sin_ptr, slot_ptr, q_ptr, k_cache_ptr, v_cache_ptr,
                      k_mean_ptr, k_inv_scale, v_inv_scale, max_value,
                      HQ: tl.constexpr, HKV: tl.constexpr, HALF: tl.constexpr,
                      HQ_BLOCK: tl.constexpr, HKV_BLOCK: tl.constexpr, QUANT: tl.constexpr,
                      HAS_MEAN: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    D: tl.constexpr = 2 * HALF
    j = tl.arange(0, HALF)[None, :]
    c1 = tl.load(cos_ptr + t * D + j).to(tl.float32)
    c2 = tl.load(cos_ptr + t * D + HALF + j).to(tl.float32)
    s1 = tl.load(sin_ptr + t * D + j).to(tl.float32)
    s2 = tl.load(sin_ptr + t * D + HALF + j).to(tl.float32)
    src = qkv_ptr + t * ((HQ + 2 * HKV) * D)
    _rope_store(src, q_ptr + t * (HQ * D), k_mean_ptr, c1, s1, c2, s2, HQ, 1.0, max_value,
                HALF, HQ_BLOCK, False, False)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    _rope_store(src + HQ * D, k_cache_ptr + slot * (HKV * D), k_mean_ptr, c1, s1, c2, s2, HKV,
                k_inv_scale, max_value, HALF, HKV_BLOCK, QUANT, HAS_MEAN)
    h = tl.arange(0, HKV_BLOCK)[:, None]
    d = tl.arange(0, D)[None, :]
    v = tl.load(src + (HQ + HKV) * D + h * D + d, mask=h < HKV, other=0.0)
    if QUANT:
        _store_kv(v_cache_ptr + slot * (HKV * D) + h * D + d, v.to(tl.float32), v_inv_scale,
                  max_value, h < HKV, QUANT)
    else:
        tl.store(v_cache_ptr + slot * (HKV * D) + h * D + d, v, mask=h < HKV)
