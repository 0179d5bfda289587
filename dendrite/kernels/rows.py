"""Row-wise fused ops of a decoder layer on CUDA: RMSNorm (with the residual add
before it), SiLU(gate) * up, and RoPE with the K/V cache write.

In eager torch each of these is a handful of elementwise kernels: RMSNorm is
seven, RoPE on q and k with the two cache writes about twelve. Inside a CUDA
graph a kernel costs ~2 us however little it does, so a multi-row decode step
of a 16-layer model spent about a millisecond on them (H100, 16 branches,
docs/benchmarks.md). Here each is one kernel.

Every kernel rounds to the model dtype exactly where the torch ops do
(transformers' order: RMSNorm normalizes in float32, rounds, then scales by
the weight in the model dtype; each RoPE product is rounded before the sum;
SiLU is rounded before the product with up), with CUDA's `expf`/`rsqrtf`
and IEEE division (dendrite/kernels/_precise.py). So the results equal the
torch ops bit for bit, except the RMSNorm sum of squares, whose float32
summation order differs.

`rows_supported(x, kernels)` says when they apply: `kernels.fused_rows`,
CUDA, fp16/bf16, Triton present, and not under torch.compile (which fuses the
torch ops itself).

FP8 KV pages (dendrite/model/kv_cache.py): `rope_write` quantizes on store,
as `KVCache.write` does -- the rotated k (rounded to the model dtype, less
the layer's `k_mean` row) and v are multiplied by 1 / scale, clamped to
+-448 (NaN kept) and rounded to nearest even into float8_e4m3fn, so both
writers store the same bytes.
Triton converts to FP8 natively from compute capability 8.9 (`fp8_supported`);
below that `rope_write` does the FP8 store in torch.
"""

from __future__ import annotations

import torch

from dendrite.kernels.config import KernelConfig, triton_available

__all__ = ["add_rms_norm", "fp8_supported", "rope_write", "rope_write_supported",
           "rows_supported", "silu_mul"]

_DTYPES = (torch.float16, torch.bfloat16)
_ALL = KernelConfig()


def rows_supported(x: torch.Tensor, kernels: KernelConfig = _ALL) -> bool:
    """True when the fused row kernels can take `x` (see the module docstring)."""
    return (kernels.fused_rows and x.is_cuda and x.dtype in _DTYPES
            and not torch.compiler.is_compiling() and triton_available())


def fp8_supported(device: torch.device | str) -> bool:
    """Whether Triton kernels on `device` can load and store float8_e4m3fn (CUDA, sm 8.9+)."""
    dev = torch.device(device)
    if dev.type != "cuda" or not torch.cuda.is_available():
        return False
    return torch.cuda.get_device_capability(dev) >= (8, 9)


def _k():
    from dendrite.kernels import _rows_triton  # noqa: PLC0415

    return _rows_triton


def _pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """`h = x + residual` (or `x`), then `(RMSNorm(h) * weight, h)`; rows of [T, N]."""
    x = x.contiguous()
    t, n = x.shape
    out = torch.empty_like(x)
    res_out = torch.empty_like(x) if residual is not None else x
    if t:
        block = _pow2(n)
        _k().add_rms_norm_kernel[(t,)](
            x, residual.contiguous() if residual is not None else x, weight, out, res_out,
            n, eps, HAS_RES=residual is not None, BLOCK=block,
            num_warps=8 if block >= 4096 else 4)
    return out, res_out


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """`silu(gate) * up` for `gate_up = [gate | up]` of shape [T, 2 I]."""
    gate_up = gate_up.contiguous()
    t, two_i = gate_up.shape
    inter = two_i // 2
    out = gate_up.new_empty((t, inter))
    if t:
        block = 1024
        _k().silu_mul_kernel[(t, -(-inter // block))](gate_up, out, inter, BLOCK=block,
                                                      num_warps=4)
    return out


def rope_write_supported(head_dim: int) -> bool:
    """Whether `rope_write` handles heads of `head_dim` (a power of two >= 16)."""
    return head_dim >= 16 and head_dim & (head_dim - 1) == 0


_FP8_MAX = 448.0  # float8_e4m3fn's largest finite value (the stores saturate there)


def rope_write(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               slot_mapping: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
               num_heads: int, num_kv_heads: int, head_dim: int,
               k_scale: float = 1.0, v_scale: float = 1.0,
               k_mean: torch.Tensor | None = None) -> torch.Tensor:
    """RoPE on q and k of `qkv` [T, (Hq + 2 Hkv) D]; writes k and v at their slots.

    `cos`/`sin` are [T, ..., D] in the model dtype; `k_cache`/`v_cache` any
    contiguous views whose slot `s` starts at element `s * Hkv * D`, in the
    model dtype or float8_e4m3fn (then stored as value / scale, saturated,
    K less `k_mean` [Hkv, D] float32 when given; see the module docstring).
    Returns the rotated q [T, Hq, D].
    """
    qkv = qkv.contiguous()
    t = qkv.shape[0]
    q = qkv.new_empty((t, num_heads, head_dim))
    fp8 = k_cache.dtype == torch.float8_e4m3fn
    if fp8 and not fp8_supported(qkv.device):
        return _rope_write_torch(qkv, cos, sin, slot_mapping, k_cache, v_cache, num_heads,
                                 num_kv_heads, head_dim, k_scale, v_scale, k_mean)
    has_mean = fp8 and k_mean is not None
    if t:
        _k().rope_write_kernel[(t,)](
            qkv, cos.contiguous(), sin.contiguous(), slot_mapping, q, k_cache, v_cache,
            k_mean.contiguous() if has_mean else qkv, 1.0 / k_scale, 1.0 / v_scale, _FP8_MAX,
            HQ=num_heads, HKV=num_kv_heads, HALF=head_dim // 2, HQ_BLOCK=_pow2(num_heads),
            HKV_BLOCK=_pow2(num_kv_heads), QUANT=fp8, HAS_MEAN=has_mean, num_warps=4)
    return q


def _rope_write_torch(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                      slot_mapping: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      hq: int, hkv: int, d: int, k_scale: float, v_scale: float,
                      k_mean: torch.Tensor | None = None) -> torch.Tensor:
    """`rope_write` in torch ops (the model's unfused expressions), for FP8 pages
    on GPUs whose Triton lacks FP8 conversions."""
    t = qkv.shape[0]
    q, k, v = qkv.split([hq * d, hkv * d, hkv * d], dim=-1)
    q, k, v = q.view(t, hq, d), k.view(t, hkv, d), v.view(t, hkv, d)

    def rot(x: torch.Tensor) -> torch.Tensor:
        x1, x2 = x.chunk(2, dim=-1)
        return x * cos + torch.cat((-x2, x1), dim=-1) * sin

    q, k = rot(q), rot(k)
    kf = k.float() - k_mean if k_mean is not None else k.float()
    for x, cache, scale in ((kf, k_cache, k_scale), (v, v_cache, v_scale)):
        y = (x.float() * (1.0 / scale)).clamp(-_FP8_MAX, _FP8_MAX).to(cache.dtype)
        cache.view(torch.uint8).view(-1, hkv, d)[slot_mapping] = y.view(torch.uint8)
    return q
