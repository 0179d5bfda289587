"""The Triton FP8 / MXFP8 weight matmul against the torch reference (GPU).

Reference: `F.linear(x, dequant(W))` in float32. The kernels never round the
dequantized weight to bf16 (the CPU path's `F.linear(x, dequant(W).to(bf16))`
does), so they are compared with float32 math and allowed one rounding of the
output plus float32 summation order. Rows 1 (single-stream decode), 4 and 16
(a few branches) and 300 (prefill); Llama-3.2-1B projection shapes and
shapes that are not multiples of any block.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

pytest.importorskip("triton")

from dendrite.kernels.fp8_matmul import fp8_matmul, supported
from dendrite.quant import quant_linear
from dendrite.quant.formats import quantize, quantize_fp8

SHAPES = [(3072, 2048), (2048, 2048), (16384, 2048), (2048, 8192), (1000, 896), (38, 200)]
ROWS = [1, 4, 16, 300]


def _close(got: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    got, ref = got.float(), ref.float()
    tol = 2 * torch.finfo(dtype).eps * ref.abs() + 2e-3 * ref.abs().max()
    bad = (got - ref).abs() > tol
    assert not bad.any(), f"{int(bad.sum())} of {ref.numel()} off, max {float((got - ref).abs().max())}"


def _data(m, n, k, dtype, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed + 7 * n + k + m)
    w = torch.randn(n, k, device="cuda", generator=g) * k ** -0.5
    w = w * torch.exp(torch.rand(n, 1, device="cuda", generator=g))  # rows of varied scale
    x = torch.randn(m, k, device="cuda", generator=g).to(dtype)
    b = torch.randn(n, device="cuda", generator=g).to(dtype)
    return w, x, b


@pytest.mark.parametrize("fmt", ["fp8", "mxfp8"])
@pytest.mark.parametrize("n,k", SHAPES)
@pytest.mark.parametrize("m", ROWS)
def test_kernel_matches_dequantized_reference(m, n, k, fmt):
    dtype = torch.bfloat16
    w, x, b = _data(m, n, k, dtype)
    q = quantize(w, fmt)
    assert supported(x, q.data, q.scale, q.block)
    ref = F.linear(x.float(), q.dequantize(torch.float32))
    _close(fp8_matmul(x, q.data, q.scale, q.block), ref, dtype)
    _close(fp8_matmul(x, q.data, q.scale, q.block, b), ref + b.float(), dtype)
    # QuantLinear's function takes the kernel here, and agrees with its CPU path.
    cpu = quant_linear(x.cpu().float(), type(q)(q.data.cpu(), q.scale.cpu(), q.block), b.cpu().float())
    _close(quant_linear(x, q, b), cpu.cuda(), dtype)


@pytest.mark.parametrize("m", [1, 16, 300])
@pytest.mark.parametrize("block", [(1, 2048), (2048, 2048), (1, 128), (64, 64)])
def test_other_scale_layouts(m, block):
    """Per-channel, per-tensor, row-granular (fused unaligned parts) and 64 x 64 blocks."""
    w, x, _ = _data(m, 3072, 2048, torch.bfloat16, seed=1)
    q = quantize_fp8(w, block)
    assert supported(x, q.data, q.scale, q.block)
    _close(fp8_matmul(x, q.data, q.scale, q.block), F.linear(x.float(), q.dequantize()),
           torch.bfloat16)


def test_fp16_activations_and_cuda_graph_capture():
    w, x, _ = _data(1, 2048, 2048, torch.float16, seed=2)
    q = quantize(w, "fp8")
    ref = F.linear(x.float(), q.dequantize())
    _close(fp8_matmul(x, q.data, q.scale, q.block), ref, torch.float16)
    xs = [x, torch.randn(8, 2048, device="cuda", dtype=torch.float16)]
    outs = [fp8_matmul(v, q.data, q.scale, q.block) for v in xs]  # compile before capture
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        graphed = [fp8_matmul(v, q.data, q.scale, q.block) for v in xs]
    g.replay()
    torch.cuda.synchronize()
    for a, b in zip(graphed, outs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("quant", ["fp8", "mxfp8"])
def test_model_on_cuda_matches_its_cpu_reference(tmp_path, quant):
    """A quantized tiny model's logits on CUDA (bf16, kernels) vs on the CPU (float32,
    dequantize + F.linear): bf16 activations apart."""
    import numpy as np

    from dendrite.model.runner import ModelRunner
    from dendrite.tiny_model import build_tiny_model

    d = build_tiny_model(tmp_path / "m", "llama", seed=0, hidden_size=256, heads=4, kv_heads=2,
                         head_dim=64, intermediate_size=512)
    prompt = [1, 5, 9, 200, 7, 3, 11, 42]
    out = {}
    for dev, dt in (("cpu", torch.float32), ("cuda", torch.bfloat16)):
        r = ModelRunner(d, device=dev, dtype=dt, num_pages=4, attention="reference",
                        quantization=quant)
        n = len(prompt)
        meta = r.build_metadata(np.arange(n), np.arange(n), np.array([0, n]), np.array([0, 1]),
                                np.array([0]), np.array([n]))
        out[dev] = r.run(torch.tensor(prompt), meta, logits_indices=np.arange(n)).float().cpu()
    rel = float((out["cuda"] - out["cpu"]).norm() / out["cpu"].norm())
    assert rel < 0.03, rel
