"""The Triton single-row GEMV and its fused prologues/epilogues (GPU).

Plain: agrees with a float32 matmul up to one rounding of the output. Fused
RMSNorm / SiLU*up / residual: agrees with the unfused torch ops computed with
the same rounding steps. Model level: a decode step through the fused layer
path gives the logits of the unfused path (float32 summation order aside).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

pytest.importorskip("triton")

from dendrite.kernels import gemv, linear, supported  # noqa: E402

SHAPES = [(3072, 2048), (2048, 2048), (16384, 2048), (2048, 8192), (1000, 896),
          (4864, 896), (896, 4864), (37, 64)]


def _close(got: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    """At most about one rounding of the output dtype apart."""
    got, ref = got.float(), ref.float()
    tol = 2 * torch.finfo(dtype).eps * ref.abs() + 2e-3 * ref.abs().max()
    bad = (got - ref).abs() > tol
    assert not bad.any(), f"{int(bad.sum())} of {ref.numel()} off, max {float((got - ref).abs().max())}"


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    return w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def _data(n, k, dtype, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed + n * 7 + k)
    r = lambda *s, scale=1.0: (torch.randn(*s, device="cuda", generator=g) * scale).to(dtype)  # noqa: E731
    return (r(n, k, scale=k ** -0.5), r(n), r(1, k), r(1, n), r(1, 2 * k), (1 + r(k, scale=0.1)))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n,k", SHAPES)
def test_plain_and_bias(n, k, dtype):
    w, b, x, *_ = _data(n, k, dtype)
    assert supported(x, w)
    _close(gemv(x, w), x.float() @ w.float().T, dtype)
    _close(gemv(x, w, b), x.float() @ w.float().T + b.float(), dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n,k", SHAPES)
def test_fused_prologues_and_residual(n, k, dtype):
    w, b, x, res, gu, nw = _data(n, k, dtype, seed=1)
    # RMSNorm prologue: the normalized row is rounded exactly as the module does.
    _close(gemv(x, w, norm_weight=nw, eps=1e-5), _rms(x, nw, 1e-5).float() @ w.float().T, dtype)
    # Residual epilogue: the matmul result is rounded before the add, as `h + o_proj(o)`.
    _close(gemv(x, w, b, residual=res),
           res.float() + F.linear(x.float(), w.float(), b.float()).to(dtype).float(), dtype)
    # SiLU(gate) * up prologue (x = [gate | up]) with the residual, as the MLP's down projection.
    gate, up = gu.split(k, dim=-1)
    ref = res.float() + ((F.silu(gate) * up).float() @ w.float().T).to(dtype).float()
    _close(gemv(gu, w, glu=True, residual=res), ref, dtype)


def test_dispatch_and_compile():
    w = torch.randn(256, 128, device="cuda", dtype=torch.bfloat16)
    one = torch.randn(1, 128, device="cuda", dtype=torch.bfloat16)
    two = torch.randn(2, 128, device="cuda", dtype=torch.bfloat16)
    assert supported(one, w) and not supported(two, w) and not supported(one.float(), w.float())
    assert not supported(one.cpu(), w.cpu())
    assert torch.equal(linear(one, w), gemv(one, w))
    torch.testing.assert_close(linear(two, w), two @ w.T)

    @torch.compile(fullgraph=True, dynamic=False)
    def f(x):
        return F.silu(linear(x, w)) * 2

    assert torch.equal(f(one), F.silu(gemv(one, w)) * 2)


@pytest.mark.parametrize("quantization", [None, "fp8", "mxfp8"])
@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_fused_decode_layer_matches_unfused(tmp_path, family, quantization):
    """Also on FP8 / MXFP8 projections (the GEMV reads e4m3 and the block
    scales) against QuantLinear's unfused path."""
    pytest.importorskip("flashinfer")
    from dendrite.kernels.config import KernelConfig
    from dendrite.model.runner import ModelRunner
    from dendrite.tiny_model import build_tiny_model

    from gpu_helpers import Pager

    model_dir = build_tiny_model(tmp_path / family, family, seed=5, hidden_size=256, heads=4,
                                 kv_heads=2, num_layers=3)
    runner = ModelRunner(model_dir, device="cuda", dtype=torch.bfloat16, num_pages=64,
                         page_size=16, attention="flashinfer", kernels=KernelConfig(),
                         quantization=quantization)
    prompt = list(range(3, 40))

    def decode_logits() -> torch.Tensor:
        pager = Pager(64, 16, seed=3)
        sid = pager.new()
        ids, meta = pager.step([(sid, prompt)], "cuda")
        nxt = int(runner.run(ids, meta).argmax(-1))
        ids, meta = pager.step([(sid, [nxt])], "cuda")
        return runner.run(ids, meta)[0]

    from dendrite.model.llama import _StepKernels

    row = torch.zeros(1, 256, device="cuda", dtype=torch.bfloat16)
    assert _StepKernels.choose(row, runner.model.model.layers[0], KernelConfig()).matmul is gemv
    fused = decode_logits()
    runner.kernels = KernelConfig(gemv=False)  # the config each step passes down
    unfused = decode_logits()
    rel = float((fused - unfused).abs().max() / unfused.abs().max())
    assert rel < 2e-2, rel
    assert int(fused.argmax()) == int(unfused.argmax())
