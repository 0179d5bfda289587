"""The Triton few-row matmul (2-16 rows) and its fused prologue/epilogues (GPU).

Plain: agrees with a float32 matmul up to one rounding of the output. Fused
RMSNorm / residual / SiLU*up: agrees with the unfused torch ops computed with
the same rounding steps. Model level: a 16-branch decode step through the
few-row layer path gives the logits of the cuBLAS path (summation order aside).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

pytest.importorskip("triton")

from dendrite.kernels import linear, skinny, skinny_supported  # noqa: E402

SHAPES = [(3072, 2048), (2048, 2048), (16384, 2048), (2048, 8192), (1000, 896),
          (4864, 896), (896, 4864), (38, 64)]
ROWS = [2, 5, 16]


def _close(got: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    """At most about one rounding of the output dtype apart."""
    got, ref = got.float(), ref.float()
    tol = 2 * torch.finfo(dtype).eps * ref.abs() + 2e-3 * ref.abs().max()
    bad = (got - ref).abs() > tol
    assert not bad.any(), f"{int(bad.sum())} of {ref.numel()} off, max {float((got - ref).abs().max())}"


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    return w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def _data(m, n, k, dtype, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed + n * 7 + k + m)
    r = lambda *s, scale=1.0: (torch.randn(*s, device="cuda", generator=g) * scale).to(dtype)  # noqa: E731
    return r(n, k, scale=k ** -0.5), r(n), r(m, k), r(m, n), (1 + r(k, scale=0.1))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n,k", SHAPES)
@pytest.mark.parametrize("m", ROWS)
def test_plain_bias_norm_residual(m, n, k, dtype):
    w, b, x, res, nw = _data(m, n, k, dtype)
    assert skinny_supported(x, w)
    _close(skinny(x, w), x.float() @ w.float().T, dtype)
    _close(skinny(x, w, b), x.float() @ w.float().T + b.float(), dtype)
    # RMSNorm prologue: the normalized rows are rounded exactly as the module does.
    _close(skinny(x, w, norm_weight=nw, eps=1e-5), _rms(x, nw, 1e-5).float() @ w.float().T, dtype)
    # Residual epilogue: the matmul result is rounded before the add, as `h + o_proj(o)`.
    _close(skinny(x, w, b, residual=res),
           res.float() + F.linear(x.float(), w.float(), b.float()).to(dtype).float(), dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n,k", [(16384, 2048), (9728, 896), (64, 64)])
@pytest.mark.parametrize("m", ROWS)
def test_glu_epilogue(m, n, k, dtype):
    """`glu_out` gives SiLU(gate) * up of the [gate | up] matmul, with the norm."""
    w, b, x, _, nw = _data(m, n, k, dtype, seed=1)
    gate_up = F.linear(_rms(x, nw, 1e-6).float(), w.float(), b.float()).to(dtype)
    gate, up = gate_up.split(n // 2, dim=-1)
    _close(skinny(x, w, b, norm_weight=nw, glu_out=True), F.silu(gate) * up, dtype)


@pytest.mark.parametrize("glu", [False, True])
@pytest.mark.parametrize("split,swap", [(2, 0), (4, 0), (1, 1), (2, 1)])
def test_split_k_is_exact_and_deterministic(split, swap, glu):
    """Split-K and swapped tiles: same tolerance as the default tile, the same
    bits on every call (partials are added in split order), and the counters
    left for the next call."""
    from dendrite.kernels.skinny import _launch

    dtype = torch.bfloat16
    w, b, x, res, nw = _data(16, 4096, 2048, dtype, seed=2)
    tile = (64 if swap else 16, 128 if swap else 256, 4, 3, split, swap)
    if glu:
        gate_up = F.linear(_rms(x, nw, 1e-6).float(), w.float(), b.float()).to(dtype)
        gate, up = gate_up.split(2048, dim=-1)
        ref = F.silu(gate) * up
        run = lambda: _launch(x, w, b, nw, 1e-6, True, None, tile)  # noqa: E731
    else:
        ref = res.float() + F.linear(x.float(), w.float(), b.float()).to(dtype).float()
        run = lambda: _launch(x, w, b, None, 0.0, False, res, tile)  # noqa: E731
    first = run()
    _close(first, ref, dtype)
    for _ in range(3):
        assert torch.equal(run(), first)


def test_dispatch():
    w = torch.randn(256, 128, device="cuda", dtype=torch.bfloat16)
    one, two, many = (torch.randn(r, 128, device="cuda", dtype=torch.bfloat16) for r in (1, 2, 17))
    assert skinny_supported(two, w)
    assert not skinny_supported(one, w) and not skinny_supported(many, w)
    assert not skinny_supported(two.float(), w.float()) and not skinny_supported(two.cpu(), w.cpu())
    assert torch.equal(linear(two, w), skinny(two, w))

    @torch.compile(fullgraph=True, dynamic=False)
    def f(x):
        return F.silu(linear(x, w)) * 2

    assert torch.equal(f(two), F.silu(skinny(two, w)) * 2)


@pytest.mark.parametrize("quantization", [None, "fp8", "mxfp8"])
@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_few_row_decode_layer_matches_cublas_path(tmp_path, family, quantization):
    """16 forked branches decode one token: few-row path vs cuBLAS + row kernels
    (FP8 / MXFP8: the fused e4m3 layer vs QuantLinear projection by projection)."""
    pytest.importorskip("flashinfer")
    from dendrite.kernels.config import KernelConfig
    from dendrite.model.runner import ModelRunner
    from dendrite.tiny_model import build_tiny_model

    from gpu_helpers import Pager

    model_dir = build_tiny_model(tmp_path / family, family, seed=5, hidden_size=256, heads=4,
                                 kv_heads=2, num_layers=3)
    runner = ModelRunner(model_dir, device="cuda", dtype=torch.bfloat16, num_pages=256,
                         page_size=16, attention="flashinfer", kernels=KernelConfig(),
                         quantization=quantization)
    prompts = [list(range(3 + i, 30 + 2 * i)) for i in range(16)]
    from dendrite.model.llama import _StepKernels

    rows = torch.zeros(16, 256, device="cuda", dtype=torch.bfloat16)
    assert _StepKernels.choose(rows, runner.model.model.layers[0], KernelConfig()).matmul is skinny

    def decode_logits() -> torch.Tensor:
        pager = Pager(256, 16, seed=3)
        sids = [pager.new() for _ in prompts]
        ids, meta = pager.step(list(zip(sids, prompts)), "cuda")
        nxt = runner.run(ids, meta).argmax(-1).tolist()
        ids, meta = pager.step([(s, [t]) for s, t in zip(sids, nxt)], "cuda")
        return runner.run(ids, meta)

    fused = decode_logits()
    runner.kernels = KernelConfig(skinny=False)  # the config each step passes down
    unfused = decode_logits()
    rel = float((fused - unfused).abs().max() / unfused.abs().max())
    assert rel < 2e-2, rel
    assert torch.equal(fused.argmax(-1), unfused.argmax(-1))
