"""The N-bit KV page format: rotation, round-trip error bounds, packing, sizes, the pool."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dendrite.model.kv_quant import (
    KV_QUANT_BITS,
    KVQuantFormat,
    kv_quant_format,
    rotation_matrix,
)
from dendrite.model.kv_quant_cache import QuantKVCache


@pytest.mark.parametrize("d", [16, 64, 128, 96, 40])
def test_rotation_is_orthogonal_and_seeded(d):
    m = rotation_matrix(d, seed=1)
    eye = torch.eye(d)
    assert torch.allclose(m @ m.T, eye, atol=1e-5) and torch.allclose(m.T @ m, eye, atol=1e-5)
    assert torch.equal(m, rotation_matrix(d, seed=1))
    assert not torch.equal(m, rotation_matrix(d, seed=2))
    x, y = torch.randn(5, d), torch.randn(5, d)
    # what attention relies on: dot products survive, and M^T undoes M
    assert torch.allclose((x @ m) @ m.T, x, atol=1e-5)
    assert torch.allclose(((x @ m) * (y @ m)).sum(-1), (x * y).sum(-1), atol=1e-4)
    if d & (d - 1) == 0:  # Hadamard with signs: every entry +-1/sqrt(D)
        assert torch.allclose(m.abs(), torch.full((d, d), d**-0.5))


@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("d,group", [(64, None), (64, 32), (128, None), (16, 8)])
def test_round_trip_within_half_a_step(bits, d, group):
    fmt = KVQuantFormat(bits, d, group)
    g = torch.Generator().manual_seed(bits * d)
    x = torch.randn(300, 2, d, generator=g) * torch.rand(300, 2, 1, generator=g) * 8
    x[0, 0] = 3.25  # a constant vector: every code 0, its value from the min
    rows = fmt.quantize(x)
    assert rows.dtype == torch.uint8 and rows.shape == (300, 2, fmt.row_bytes)
    y = fmt.dequantize(rows)
    scale, _ = fmt.scales(rows)
    step = scale.repeat_interleave(fmt.group_size, -1)
    err = (y - x).abs()
    # half a step, plus fp16 rounding of the stored scale and min
    assert (err <= 0.5 * step * 1.01 + 2**-10 * x.abs().amax(-1, keepdim=True)).all()
    assert torch.allclose(y[0, 0], torch.full((d,), 3.25))
    codes = fmt.codes(rows)
    assert int(codes.max()) <= (1 << bits) - 1
    # decoding then encoding again gives the same bytes
    assert torch.equal(fmt.quantize(y), rows)


@pytest.mark.parametrize("bits,bound", [(4, 0.10), (3, 0.21)])
def test_relative_error_on_rotated_gaussians(bits, bound):
    """The expected size of the error: RMS of a min/max grid of 2^bits levels over
    64 Gaussian channels (about 0.09 at 4 bits, 0.19 at 3)."""
    fmt = KVQuantFormat(bits, 64)
    m = rotation_matrix(64)
    x = torch.randn(2000, 64, generator=torch.Generator().manual_seed(0))
    y = fmt.dequantize(fmt.quantize(x @ m)) @ m.T
    rel = ((y - x).norm() / x.norm()).item()
    assert bound * 0.7 < rel < bound


def test_rotation_spreads_an_outlier_channel():
    """One huge channel wastes a per-vector min/max grid; rotated, it does not."""
    fmt = KVQuantFormat(4, 64)
    m = rotation_matrix(64)
    x = torch.randn(500, 64, generator=torch.Generator().manual_seed(1))
    x[:, 7] += 40.0
    plain = fmt.dequantize(fmt.quantize(x))
    rotated = fmt.dequantize(fmt.quantize(x @ m)) @ m.T
    small = [c for c in range(64) if c != 7]  # the error on the ordinary channels
    assert (rotated - x)[:, small].norm() < 0.5 * (plain - x)[:, small].norm()


def test_packing_layout():
    """Channel c of a width-w plane of n bytes sits at byte c % n, shift w * (c // n)."""
    fmt = KVQuantFormat(3, 16)
    codes = torch.arange(16) % 8
    x = codes.float()[None]  # min 0, scale 7/7 = 1: codes are the values
    x[0, 0] = 0.0
    rows = fmt.quantize(x)[0]
    assert fmt.row_bytes == 16 * 3 // 8 + 4 == len(rows)
    for c in range(16):
        lo = (int(rows[c % 4]) >> (2 * (c // 4))) & 3
        hi = (int(rows[4 + c % 2]) >> (c // 2)) & 1
        assert lo | hi << 2 == int(codes[c])
    four = KVQuantFormat(4, 16).quantize(torch.arange(16).float()[None])[0]
    assert [int(four[c % 8]) >> (4 * (c // 8)) & 15 for c in range(16)] == list(range(16))


def test_bytes_per_token():
    # SmolLM2-135M: 30 layers, 3 KV heads, head_dim 64
    f4, f3 = kv_quant_format("int4", 64), kv_quant_format("int3", 64)
    assert (f4.row_bytes, f3.row_bytes) == (32 + 4, 24 + 4)
    assert f4.bytes_per_token(30, 3) == 30 * 2 * 3 * 36
    assert KVQuantFormat(4, 128, 32).row_bytes == 64 + 16
    assert KV_QUANT_BITS == {"int4": 4, "int3": 3}


@pytest.mark.parametrize("kw,match", [
    ({"bits": 2, "head_dim": 64}, "bits must be 3 or 4"),
    ({"bits": 4, "head_dim": 60}, "head_dim must be a multiple of 8"),
    ({"bits": 4, "head_dim": 64, "group_size": 24}, "group_size must divide head_dim=64"),
])
def test_bad_format(kw, match):
    with pytest.raises(ValueError, match=match):
        KVQuantFormat(**kw)


def test_bad_names_and_rows():
    with pytest.raises(ValueError, match=r"kv_dtype must be one of \['int3', 'int4'\], got 'int2'"):
        kv_quant_format("int2", 64)
    fmt = KVQuantFormat(4, 64)
    with pytest.raises(ValueError, match="rows must be uint8"):
        fmt.dequantize(torch.zeros(3, 36))
    with pytest.raises(ValueError, match="last dim must be head_dim=64"):
        fmt.quantize(torch.zeros(3, 32))


def test_pool_write_copy_and_size():
    fmt = KVQuantFormat(4, 16)
    pool = QuantKVCache(2, 8, 4, 2, fmt, "cpu")
    assert pool.kv.shape == (2, 2, 8, 4, 2, fmt.row_bytes) and pool.kv.dtype == torch.uint8
    assert pool.nbytes == 8 * QuantKVCache.bytes_per_page(2, 4, 2, fmt)
    k, v = torch.randn(6, 2, 16), torch.randn(6, 2, 16)
    slots = torch.tensor([4, 5, 6, 7, 8, 9])  # page 1 full, page 2 half
    pool.write(1, slots, k, v)
    kc, _ = pool.layer(1)
    back = fmt.dequantize(kc.reshape(-1, 2, fmt.row_bytes)[slots]) @ pool.rotation.T
    assert ((back - k).norm() / k.norm()) < 0.12
    # copy-on-write of page 2's two tokens to page 5 carries codes and scales
    pool.copy_pages(np.array([[2, 5, 2]], dtype=np.int32))
    assert torch.equal(pool.kv[:, :, 5, :2], pool.kv[:, :, 2, :2])
    assert not pool.kv[:, :, 5, 2:].any()
    with pytest.raises(ValueError, match="invalid copy-on-write rows"):
        pool.copy_pages(np.array([[2, 8, 1]]))
    with pytest.raises(TypeError, match="fmt must be a KVQuantFormat"):
        QuantKVCache(2, 8, 4, 2, "int4", "cpu")
