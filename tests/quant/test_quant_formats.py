"""FP8 / MXFP8 weight formats: quantize/dequantize round trips, scales, fusing, bad input."""

from __future__ import annotations

import pytest
import torch

from dendrite.quant import QuantLinear, quant_linear
from dendrite.quant.formats import (
    FP8,
    FP8_MAX,
    QuantizedWeight,
    cat_rows,
    dequantize,
    e8m0_decode,
    fused_block,
    quantize,
    quantize_fp8,
    quantize_mxfp8,
    scale_grid,
)


def _w(n: int, k: int, seed: int = 0, spread: float = 3.0) -> torch.Tensor:
    """Weights whose magnitude varies a lot between rows and columns."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    return w * torch.exp(spread * torch.rand(n, 1, generator=g)) \
        * torch.exp(torch.rand(1, k, generator=g))


def _check_error_bound(w: torch.Tensor, q: QuantizedWeight) -> None:
    """Each element within e4m3's rounding: half a step of 3 mantissa bits
    (2^-4 relative) for normals, 2^-10 of the block scale for subnormals."""
    n, k = w.shape
    s = scale_grid(q).repeat_interleave(q.block[0], 0)[:n].repeat_interleave(q.block[1], 1)[:, :k]
    err = (q.dequantize() - w).abs()
    bound = torch.maximum(w.abs() * 2.0**-4, s * 2.0**-10) * (1 + 1e-6)
    assert (err <= bound).all(), float((err / bound).max())


@pytest.mark.parametrize("shape", [(256, 384), (130, 200), (3, 33), (1, 1)])
def test_fp8_block_scales_are_amax_over_448(shape):
    w = _w(*shape)
    q = quantize_fp8(w)
    n, k = shape
    assert q.data.dtype == FP8 and q.shape == shape and q.block == (128, 128)
    assert q.scale.dtype == torch.float32 and q.scale.shape == (-(-n // 128), -(-k // 128))
    for i in range(q.scale.shape[0]):
        for j in range(q.scale.shape[1]):
            blk = w[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128]
            assert q.scale[i, j] == blk.abs().max() / FP8_MAX
    # The largest element of each block lands on +-448 (the scale makes it so).
    assert q.data.float().abs().max() == FP8_MAX
    _check_error_bound(w, q)


@pytest.mark.parametrize("shape", [(64, 256), (5, 33), (2, 7)])
def test_mxfp8_scales_are_powers_of_two_and_nothing_saturates(shape):
    w = _w(*shape, seed=1)
    q = quantize_mxfp8(w)
    n, k = shape
    assert q.block == (1, 32) and q.scale.dtype == torch.uint8
    assert q.scale.shape == (n, -(-k // 32))
    s = e8m0_decode(q.scale)
    assert torch.equal(s, torch.exp2(q.scale.float() - 127))  # e8m0: 2^(e - 127)
    assert (q.scale < 255).all()  # 255 is e8m0's NaN
    # The exponent is the smallest with amax / 2^e <= 448: in (224, 448].
    pad = torch.nn.functional.pad(w, (0, -k % 32)).view(n, -1, 32)
    ratio = pad.abs().amax(-1) / s
    assert (ratio <= FP8_MAX).all() and (ratio > FP8_MAX / 2).all()
    _check_error_bound(w, q)


def test_e8m0_of_exact_powers_of_two():
    w = torch.zeros(1, 64)
    w[0, 0] = 448.0 * 2.0**-3  # amax / 448 exactly 2^-3: exponent -3, nothing lost
    w[0, 32] = 384.0 * 2.0**5  # 384 is an e4m3 value; 2^5 the smallest scale that fits
    q = quantize_mxfp8(w)
    assert q.scale.tolist() == [[127 - 3, 127 + 5]]
    assert torch.equal(q.dequantize(), w)


def test_zero_blocks_and_saturation():
    w = torch.zeros(256, 256)
    w[200:, 200:] = torch.randn(56, 56) * 1e30  # one block near fp32's top
    for fmt in ("fp8", "mxfp8"):
        q = quantize(w, fmt)
        d = q.dequantize()
        assert torch.isfinite(d).all() and torch.isfinite(q.data.float()).all()
        assert q.data.float().abs().max() <= FP8_MAX
        assert (d[:200] == 0).all() and (d[:, :200] == 0).all()
        _check_error_bound(w, q)


def test_bf16_input_and_output_dtype():
    w = _w(128, 256).to(torch.bfloat16)
    q = quantize_fp8(w)
    assert dequantize(q, torch.bfloat16).dtype == torch.bfloat16
    _check_error_bound(w.float(), q)


@pytest.mark.parametrize("bad,match", [
    (torch.ones(4), "2-D float"),
    (torch.ones(4, 4, dtype=torch.int32), "2-D float"),
    (torch.ones(4, 4).to(FP8), "wider than fp8"),
    (torch.ones(0, 4), "non-empty"),
])
def test_bad_weights_are_refused(bad, match):
    with pytest.raises(ValueError, match=match):
        quantize_fp8(bad)


def test_non_finite_weights_and_unknown_format_are_refused():
    w = torch.ones(4, 4)
    w[1, 1] = float("nan")
    with pytest.raises(ValueError, match="inf or NaN"):
        quantize_fp8(w)
    with pytest.raises(ValueError, match="inf or NaN"):
        quantize_mxfp8(w)
    with pytest.raises(ValueError, match="fp8, mxfp8.*'int4'"):
        quantize(torch.ones(4, 4), "int4")


def test_quantized_weight_checks_its_scale_shape():
    q = quantize_fp8(_w(130, 200))
    with pytest.raises(ValueError, match="expected \\(2, 2\\)"):
        QuantizedWeight(q.data, q.scale[:1], q.block)


@pytest.mark.parametrize("fmt", ["fp8", "mxfp8"])
@pytest.mark.parametrize("rows", [[128, 256, 128], [64, 32, 32], [100], [130, 7]])
def test_cat_rows_dequantizes_to_the_parts(fmt, rows):
    parts = [quantize(_w(r, 160, seed=i), fmt) for i, r in enumerate(rows)]
    fused = cat_rows(parts)
    assert fused.block == fused_block(rows, [p.block for p in parts])
    assert torch.equal(fused.dequantize(), torch.cat([p.dequantize() for p in parts]))
    aligned = all(r % parts[0].block[0] == 0 for r in rows[:-1])
    assert fused.block[0] == (parts[0].block[0] if aligned else 1)


def test_quant_linear_cpu_is_dequantize_then_linear():
    w, x, b = _w(48, 80), torch.randn(5, 80), torch.randn(48)
    for fmt in ("fp8", "mxfp8"):
        q = quantize(w, fmt)
        assert torch.equal(quant_linear(x, q, b), torch.nn.functional.linear(x, q.dequantize(), b))
        # [..., K] inputs keep their leading dims.
        assert quant_linear(x.view(1, 5, 80), q).shape == (1, 5, 48)


def test_quant_linear_module_keeps_its_dtypes_through_to():
    q = quantize_fp8(_w(48, 80))
    m = QuantLinear(80, 48, True, q.block, mx=False)
    m.set_weight(q)
    m.bias.data.zero_()
    m = m.to(torch.bfloat16)
    assert m.weight.dtype == FP8 and m.weight_scale.dtype == torch.float32
    assert m.bias.dtype == torch.bfloat16
    assert torch.equal(m.quantized.dequantize(), q.dequantize())
    with torch.device("meta"):
        empty = QuantLinear(80, 48, False, q.block, mx=True)
    empty = empty.to(torch.float16).to_empty(device="cpu")
    assert empty.weight.device.type == "cpu" and empty.weight_scale.dtype == torch.uint8
    with pytest.raises(ValueError, match="does not fit"):
        empty.set_weight(q)  # fp8 scales into an mxfp8 module


@pytest.mark.parametrize("shape", [(256, 384), (130, 200), (3, 33)])
def test_searched_fp8_scales_never_round_worse_than_amax(shape):
    """search=True: each block's scale is c * amax / 448 for a c of SCALE_SEARCH,
    and its round-trip error is at most the amax scale's (c = 1 is a candidate);
    some block of a Gaussian weight finds a smaller one."""
    from dendrite.quant.formats import SCALE_SEARCH

    w = _w(*shape, seed=4)
    plain, searched = quantize_fp8(w), quantize_fp8(w, search=True)
    assert searched.block == plain.block and searched.scale.shape == plain.scale.shape
    ratio = (searched.scale / plain.scale).flatten().tolist()
    assert all(any(abs(r - c) < 1e-5 for c in SCALE_SEARCH) for r in ratio), ratio
    bn, bk = plain.block
    for i in range(plain.scale.shape[0]):
        for j in range(plain.scale.shape[1]):
            blk = (slice(i * bn, (i + 1) * bn), slice(j * bk, (j + 1) * bk))
            e_plain = (dequantize(plain)[blk] - w[blk].float()).square().sum()
            e_searched = (dequantize(searched)[blk] - w[blk].float()).square().sum()
            assert e_searched <= e_plain, (i, j, float(e_searched), float(e_plain))
    if shape[0] * shape[1] > 1000:
        assert min(ratio) < 1.0
    # What a load quantizes to: `quantize(w, "fp8")` searches.
    q = quantize(w, "fp8")
    assert torch.equal(q.scale, searched.scale)
