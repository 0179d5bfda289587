"""Fused row kernels (RMSNorm + residual, SiLU*up, RoPE + K/V write) vs the torch ops (GPU).

SiLU*up and RoPE + cache write must equal the torch ops bit for bit; the
residual add too. RMSNorm may differ only where its float32 sum of squares,
summed in another order, rounds the output differently (at most two units in
the last place of the model dtype). Model level: prefill and decode through
the fused kernels give the logits and greedy tokens of the unfused path.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

pytest.importorskip("triton")

from dendrite.kernels.rows import add_rms_norm, rope_write, rows_supported, silu_mul  # noqa: E402
from dendrite.model.llama import RMSNorm, _rotate_half  # noqa: E402

DTYPES = [torch.bfloat16, torch.float16]


def _ulps_apart(a: torch.Tensor, b: torch.Tensor) -> int:
    """Largest distance in units in the last place of the dtype between a and b."""
    bits = {torch.bfloat16: torch.int16, torch.float16: torch.int16}[a.dtype]
    return int((a.view(bits).int() - b.view(bits).int()).abs().max())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,n", [(1, 2048), (16, 2048), (300, 896), (7, 4096), (3, 1000)])
def test_add_rms_norm(rows, n, dtype):
    g = torch.Generator(device="cuda").manual_seed(rows * n)
    x = torch.randn(rows, n, device="cuda", generator=g).to(dtype)
    res = torch.randn(rows, n, device="cuda", generator=g).to(dtype)
    norm = RMSNorm(n, 1e-5).cuda().to(dtype)
    norm.weight.data = (1 + 0.1 * torch.randn(n, device="cuda", generator=g)).to(dtype)
    assert rows_supported(x)
    out, h = add_rms_norm(x, res, norm.weight, norm.eps)
    assert torch.equal(h, res + x)
    ref = norm(res + x)
    # Another summation order moves rstd by a few float32 ulps; after the two
    # roundings (normalized row, then times the weight) that is at most 2 ulps.
    assert _ulps_apart(out, ref) <= 2
    assert (out != ref).float().mean() < 0.01
    out, same = add_rms_norm(x, None, norm.weight, norm.eps)
    assert same is x or torch.equal(same, x)
    assert _ulps_apart(out, norm(x)) <= 2


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,inter", [(1, 8192), (16, 8192), (64, 4864), (5, 1000)])
def test_silu_mul_is_exact(rows, inter, dtype):
    g = torch.Generator(device="cuda").manual_seed(rows + inter)
    gu = (3 * torch.randn(rows, 2 * inter, device="cuda", generator=g)).to(dtype)
    gate, up = gu.split(inter, dim=-1)
    assert torch.equal(silu_mul(gu), F.silu(gate) * up)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hq,hkv,d", [(32, 8, 64), (14, 2, 64), (16, 8, 128), (4, 4, 16)])
def test_rope_write_is_exact(hq, hkv, d, dtype):
    g = torch.Generator(device="cuda").manual_seed(hq * d)
    t, pages, page = 9, 12, 16
    qkv = torch.randn(t, (hq + 2 * hkv) * d, device="cuda", generator=g).to(dtype)
    inv = 1.0 / (500000.0 ** (torch.arange(0, d, 2, device="cuda").float() / d))
    pos = torch.randint(0, 100_000, (t,), device="cuda", generator=g)
    freqs = pos.float()[:, None] * inv[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos().to(dtype)[:, None, :], emb.sin().to(dtype)[:, None, :]
    kc = torch.zeros(pages, page, hkv, d, device="cuda", dtype=dtype)
    vc = torch.zeros_like(kc)
    slots = torch.randperm(pages * page, device="cuda", generator=g)[:t]
    q = rope_write(qkv, cos, sin, slots, kc, vc, hq, hkv, d)
    qr, k, v = qkv.split([hq * d, hkv * d, hkv * d], dim=-1)
    qr, k, v = qr.view(t, hq, d), k.view(t, hkv, d), v.view(t, hkv, d)
    assert torch.equal(q, qr * cos + _rotate_half(qr) * sin)
    assert torch.equal(kc.view(-1, hkv, d)[slots], k * cos + _rotate_half(k) * sin)
    assert torch.equal(vc.view(-1, hkv, d)[slots], v)
    untouched = torch.ones(pages * page, dtype=torch.bool, device="cuda")
    untouched[slots] = False
    assert not kc.view(-1, hkv, d)[untouched].any() and not vc.view(-1, hkv, d)[untouched].any()


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
def test_model_with_fused_rows_matches_unfused(tmp_path, family):
    pytest.importorskip("flashinfer")
    from dendrite.kernels.config import KernelConfig
    from dendrite.model.runner import ModelRunner
    from dendrite.tiny_model import build_tiny_model

    from gpu_helpers import Pager

    model_dir = build_tiny_model(tmp_path / family, family, seed=7, hidden_size=256, heads=4,
                                 kv_heads=2, num_layers=3)
    runner = ModelRunner(model_dir, device="cuda", dtype=torch.bfloat16, num_pages=64,
                         page_size=16, attention="flashinfer", kernels=KernelConfig())
    prompts = [list(range(3, 40)), list(range(50, 71))]

    def run() -> tuple[torch.Tensor, torch.Tensor]:
        pager = Pager(64, 16, seed=3)
        sids = [pager.new() for _ in prompts]
        ids, meta = pager.step(list(zip(sids, prompts)), "cuda")
        first = runner.run(ids, meta)  # prefill: many rows
        nxt = first.argmax(-1).tolist()
        ids, meta = pager.step([(s, [t]) for s, t in zip(sids, nxt)], "cuda")
        return first, runner.run(ids, meta)  # decode: one row per sequence

    fused = run()
    runner.kernels = KernelConfig(fused_rows=False)  # the config each step passes down
    unfused = run()
    for f, u in zip(fused, unfused):
        rel = float((f - u).abs().max() / u.abs().max())
        assert rel < 2e-2, rel
        assert f.argmax(-1).tolist() == u.argmax(-1).tolist()
