"""FP8 (e4m3) KV pages on the GPU: every reader against the torch reference on
the same pages, the fused writer against the torch writer, and the engine with
CUDA graphs against the eager engine.

Scales are set to powers of two other than 1 (K 2^-2, V 2^3) wherever a reader
takes them, so a reader that ignored one would be off by 4x or 8x.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

from gpu_helpers import rel_err, report

from dendrite.attention.base import build_attention_metadata
from dendrite.attention.reference import ReferenceBackend
from dendrite.model.kv_cache import KVScales, quantize

E4M3 = torch.float8_e4m3fn
PS, NP = 16, 96
KS, VS = 2.0**-2, 2.0**3


def _pages(hkv: int, d: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator(device="cuda").manual_seed(seed)
    k = torch.randn(NP, PS, hkv, d, device="cuda", generator=g) * 2
    v = torch.randn(NP, PS, hkv, d, device="cuda", generator=g) * 20
    return quantize(k, KS), quantize(v, VS)


def _scales() -> KVScales:
    s = KVScales(1)
    s.set([KS], [VS])
    return s


def _meta(q_lens: list[int], kv_lens: list[int], seed: int = 0):
    rng = np.random.default_rng(seed)
    n_pages = [-(-n // PS) for n in kv_lens]
    pages = rng.permutation(NP - 1)[:sum(n_pages)]
    indptr = np.concatenate([[0], np.cumsum(n_pages)])
    last = [n - (p - 1) * PS for n, p in zip(kv_lens, n_pages)]
    pos, slots = [], []
    for b, (ql, kl) in enumerate(zip(q_lens, kv_lens)):
        for t in range(kl - ql, kl):
            pos.append(t)
            slots.append(int(pages[indptr[b] + t // PS]) * PS + t % PS)
    qo = np.concatenate([[0], np.cumsum(q_lens)])
    return build_attention_metadata(pos, slots, qo, indptr, pages, last, page_size=PS,
                                    device="cuda")


@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("q_lens", [[1, 1, 1], [5, 17, 1]], ids=["decode", "prefill"])
def test_flashinfer_fp8_matches_the_reference_on_the_same_pages(d, q_lens):
    pytest.importorskip("flashinfer")
    from dendrite.attention.flashinfer_backend import FlashInferBackend

    hq, hkv = 8, 2
    k, v = _pages(hkv, d)
    meta = _meta(q_lens, [37, 70, 5])
    q = torch.randn(meta.num_tokens, hq, d, device="cuda", dtype=torch.bfloat16)
    fi = FlashInferBackend(hq, hkv, d, PS, dtype=torch.bfloat16, device="cuda",
                           kv_dtype=E4M3, kv_scales=_scales())
    ref = ReferenceBackend(hq, hkv, d, PS, kv_scales=_scales())
    fi.plan(meta)
    ref.plan(meta)
    out, want = fi.forward(0, q, k, v), ref.forward(0, q, k, v)
    err = float(rel_err(out.float().flatten(1), want.float().flatten(1)).max())
    report("fp8_flashinfer_vs_reference", d=d, q_lens=q_lens, rel_err=err)
    assert err < 2e-2
    # the scales matter: reading the pages unscaled is far off
    bad = ReferenceBackend(hq, hkv, d, PS)
    bad.plan(meta)
    assert float(rel_err(bad.forward(0, q, k, v).float().flatten(1),
                         want.float().flatten(1)).max()) > 0.5


def test_graph_wrappers_and_tree_attention_read_fp8_pages():
    """FlashInfer's graph decode and two-level cascade wrappers and the
    tree-attention kernel, fed the layer's scales as the graphs feed them."""
    pytest.importorskip("flashinfer")
    from dendrite.attention.cascade import split_levels
    from dendrite.attention.flashinfer_backend import (
        FlashInferBackend,
        GraphCascadeWrapper,
        GraphDecodeWrapper,
        scale_kwargs,
    )
    from dendrite.kernels import tree_attention
    from dendrite.kernels.tree_attention import TreeAttention

    hq, hkv, d, b = 8, 2, 64, 4
    k, v = _pages(hkv, d, seed=1)
    shared = 4  # 4 full pages common to the rows, then each row's own
    rng = np.random.default_rng(3)
    perm = rng.permutation(NP - 1)
    own = [2, 1, 3, 1]
    rows, at = [], shared
    for n in own:
        rows.append(np.concatenate([perm[:shared], perm[at:at + n]]))
        at += n
    indptr = np.concatenate([[0], np.cumsum([len(r) for r in rows])]).astype(np.int32)
    indices = np.concatenate(rows).astype(np.int32)
    last = np.array([3, 16, 9, 1], dtype=np.int32)
    q = torch.randn(b, hq, d, device="cuda", dtype=torch.bfloat16)
    scales = _scales()
    ref = ReferenceBackend(hq, hkv, d, PS, kv_scales=scales)
    ref.plan(build_attention_metadata(np.zeros(b), np.zeros(b), np.arange(b + 1), indptr,
                                      indices, last, page_size=PS, device="cuda",
                                      validate=False))
    want = ref.forward(0, q, k, v).float()
    fi = FlashInferBackend(hq, hkv, d, PS, dtype=torch.bfloat16, device="cuda",
                           kv_dtype=E4M3, kv_scales=scales)
    kw = scale_kwargs(scales, 0)
    assert kw == {"k_scale": KS, "v_scale": VS}
    gw = GraphDecodeWrapper(fi, b, 64)
    gw.plan(torch.from_numpy(indptr), torch.from_numpy(indices).cuda(), torch.from_numpy(last))
    errs = {"flat": gw.run(q, k, v, **kw)}
    cw = GraphCascadeWrapper(fi, b, 64)
    sh, own_indptr, own_indices = split_levels(indptr, indices, shared)
    cw.plan(torch.from_numpy(sh).cuda(), torch.from_numpy(own_indptr),
            torch.from_numpy(own_indices).cuda(), torch.from_numpy(last))
    errs["cascade"] = cw.run(q, k, v, **kw)
    assert tree_attention.supported(hq, hkv, d, torch.bfloat16, "cuda", kv_dtype=E4M3)
    ta = TreeAttention(hq, hkv, d, PS, b, 64, "cuda")
    ta.plan(indptr, indices, last, shared)
    errs["tree"] = ta.run(q, k, v, **kw)
    errs = {n: float(rel_err(o.float().flatten(1), want.flatten(1)).max())
            for n, o in errs.items()}
    report("fp8_graph_readers_vs_reference", **errs)
    assert max(errs.values()) < 2e-2, errs


def _same_values(a: torch.Tensor, b: torch.Tensor) -> None:
    """Two FP8 byte tensors hold the same values (NaN where the other has NaN)."""
    torch.testing.assert_close(a.view(E4M3).float(), b.view(E4M3).float(), rtol=0, atol=0,
                               equal_nan=True)


def test_fused_writer_stores_the_torch_writers_bytes():
    """rope_write into FP8 pages (scales, K mean) == the torch ops, byte for byte;
    and == KVCache.write of the torch-rotated k."""
    pytest.importorskip("triton")
    from dendrite.kernels.rows import _rope_write_torch, fp8_supported, rope_write

    if not fp8_supported("cuda"):
        pytest.skip("Triton FP8 conversions need compute capability 8.9+")
    hq, hkv, d, t = 8, 2, 64, 37
    g = torch.Generator(device="cuda").manual_seed(5)
    qkv = (torch.randn(t, (hq + 2 * hkv) * d, device="cuda", generator=g) * 8).to(torch.bfloat16)
    qkv[3, (hq + hkv) * d] = 1e4  # saturates (V scale 8: 1250 -> 448)
    qkv[4, (hq + hkv) * d + 1] = float("nan")  # stays NaN
    pos = torch.arange(t, device="cuda").float() * 7
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2, device="cuda").float() / d))
    emb = torch.cat([pos[:, None] * inv] * 2, -1)
    cos, sin = emb.cos().to(torch.bfloat16)[:, None], emb.sin().to(torch.bfloat16)[:, None]
    slots = torch.randperm(NP * PS, device="cuda", generator=g)[:t]
    k_mean = torch.randn(hkv, d, device="cuda", generator=g) * 5
    got, want = [], []
    for fn, out in ((rope_write, got), (_rope_write_torch, want)):
        kc = torch.zeros(NP, PS, hkv, d, device="cuda", dtype=E4M3)
        vc = torch.zeros_like(kc)
        q = fn(qkv, cos, sin, slots, kc, vc, hq, hkv, d, KS, VS, k_mean)
        out += [q, kc.view(torch.uint8), vc.view(torch.uint8)]
    assert torch.equal(got[0], want[0])  # q: rotated, unscaled, model dtype
    assert torch.equal(got[1], want[1])
    _same_values(got[2], want[2])  # (V holds a NaN: its byte may differ in sign)
    vf = got[2].view(E4M3).float().view(-1, hkv, d)[slots]
    assert vf[3, 0, 0].item() == 448.0 and torch.isnan(vf[4, 0, 1])
    assert not torch.isnan(vf[5]).any()
    from dendrite.model.kv_cache import KVCache

    pool = KVCache(1, NP, PS, hkv, d, torch.bfloat16, "cuda", kv_dtype="fp8_e4m3")
    pool.scales.set([KS], [VS])
    pool.set_k_mean(k_mean[None])
    k = qkv[:, hq * d:(hq + hkv) * d].view(t, hkv, d)
    v = qkv[:, (hq + hkv) * d:].view(t, hkv, d)
    k1, k2 = k.chunk(2, dim=-1)
    k_rot = k * cos + torch.cat((-k2, k1), dim=-1) * sin  # the model's RoPE expression
    pool.write(0, slots, k_rot, v)
    assert torch.equal(pool.kv[0, 0].view(torch.uint8), got[1])
    _same_values(pool.kv[0, 1].view(torch.uint8), got[2])


@pytest.mark.parametrize("cascade", ["never", "always"])
def test_fp8_engine_with_graphs_matches_eager(tmp_path, cascade):
    """Forked leaves decode through the CUDA graphs (flat, or tree attention over
    the shared prefix) on FP8 pages with the tokens and logprobs of the eager
    engine, and the engine's FP8 pool holds twice the pages of the bf16 one."""
    pytest.importorskip("flashinfer")
    from dendrite.engine import Engine
    from dendrite.sampling import SamplingParams
    from dendrite.tiny_model import build_tiny_model

    d = build_tiny_model(tmp_path / "m", "llama", seed=4, hidden_size=256, heads=4, kv_heads=2,
                         num_layers=2, dtype="bfloat16")
    prompt = list(range(5, 300))

    def run(graphs: bool):
        e = Engine(d, device="cuda", dtype=torch.bfloat16, num_pages=512, cascade=cascade,
                   cuda_graphs=graphs, kv_dtype="fp8_e4m3", prefix_cache=False)
        assert e.runner.kv_cache.kv.dtype == E4M3
        if graphs:
            assert e.runner.graphs is not None
        kids = e.new_sequence(prompt).fork(6)
        res = e.generate(kids, [SamplingParams(temperature=0.0, max_tokens=24,
                                               ignore_eos=True) for _ in kids])
        stats = dict(e.runner.graphs.stats) if graphs else {}
        e.close()
        return res, stats

    (eager, _), (graphed, stats) = run(False), run(True)
    assert stats["cascade_steps" if cascade == "always" else "flat_steps"] > 0

    def common(a, b) -> int:  # tokens equal up to the first difference (then histories differ)
        n = 0
        while n < min(len(a), len(b)) and a[n] == b[n]:
            n += 1
        return n

    prefix = [common(a.token_ids, b.token_ids) for a, b in zip(eager, graphed)]
    lp = max(float(np.max(np.abs(np.subtract(a.logprobs[:n], b.logprobs[:n])), initial=0.0))
             for a, b, n in zip(eager, graphed, prefix))
    report("fp8_engine_graphs_vs_eager", cascade=cascade, common_prefix=prefix,
           logprob_diff=lp)
    assert sum(n >= 8 for n in prefix) >= 5 and lp < 0.1


def test_fp8_default_pool_is_twice_the_bf16_pool(tmp_path):
    from dendrite.model.loader import load_config
    from dendrite.model.runner import default_num_pages
    from dendrite.tiny_model import build_tiny_model

    d = build_tiny_model(tmp_path / "m", "llama", seed=1, dtype="bfloat16")
    cfg = load_config(d)
    dev = torch.device("cuda")
    n16 = default_num_pages(cfg, 16, torch.bfloat16, dev)
    n8 = default_num_pages(cfg, 16, E4M3, dev)
    assert abs(n8 - 2 * n16) <= 2 + n16 // 100  # (free memory moves a little between calls)
