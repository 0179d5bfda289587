"""Speculative decoding on CUDA (GPU): fp32 output equals the plain run token for
token; in bf16 with FlashInfer and CUDA graphs the verify steps replay graphs
and the output can leave the plain run's only at a near-tie (batch-shape
rounding), never elsewhere."""

from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

REPEAT = ("The quick brown fox jumps over the lazy dog. def fork(node, n): return "
          "[child(node) for _ in range(n)] The quick brown fox jumps over the lazy dog. def fork(")


def generate(d, dtype, spec, n=4, **kw):
    from dendrite.engine import Engine
    from dendrite.sampling import SamplingParams

    e = Engine(d, device="cuda", dtype=dtype, num_pages=512, speculative=spec, **kw)
    kids = e.new_sequence(REPEAT).fork(n)
    params = [SamplingParams(temperature=0 if i == 0 else 0.8, seed=i, max_tokens=32,
                             ignore_eos=True, logprobs=2) for i in range(n)]
    res = e.generate(kids, params)
    stats = dict(e.stats)
    graphs = dict(e.runner.graphs.stats) if e.runner.graphs is not None else {}
    e.close()
    # Only the radix cache's (evictable) prompt pages outlive the sequences.
    assert e.pool.used == (e.cache.num_entries if e.cache is not None else 0)
    assert e.cache is None or e.cache.num_pinned == 0
    return res, stats, graphs


def specs(d):
    from dendrite.speculative import SpeculativeConfig

    return {"ngram": SpeculativeConfig(num_draft=4, width=2),
            "model": SpeculativeConfig(method="model", draft_model=str(d), num_draft=4)}


def test_fp32_reference_equals_plain(tmp_path):
    from dendrite.tiny_model import build_tiny_model

    d = build_tiny_model(tmp_path / "m", "llama", seed=3)
    want, _, _ = generate(d, torch.float32, None, attention="reference", cuda_graphs=False)
    for name, spec in specs(d).items():
        got, stats, _ = generate(d, torch.float32, spec, attention="reference",
                                 cuda_graphs=False)
        assert stats["spec_steps"] > 0, name
        assert [r.token_ids for r in got] == [r.token_ids for r in want], name


def test_bf16_graphs_replay_verify_steps(tmp_path):
    pytest.importorskip("flashinfer")
    from dendrite.tiny_model import build_tiny_model

    d = build_tiny_model(tmp_path / "m", "llama", seed=4, hidden_size=256, heads=4, kv_heads=2,
                         num_layers=2, dtype="bfloat16")
    want, _, _ = generate(d, torch.bfloat16, None)
    for name, spec in specs(d).items():
        got, stats, graphs = generate(d, torch.bfloat16, spec)
        assert stats["spec_steps"] > 0, name
        # Every step of a run replays a graph: the decode-shaped verify steps too.
        replays = graphs["flat_steps"] + graphs["cascade_steps"]
        assert replays >= stats["steps"] - 2, (name, graphs, stats)
        for w, g in zip(want, got):
            if g.token_ids == w.token_ids:
                continue
            i = next(i for i, (a, b) in enumerate(zip(w.token_ids, g.token_ids)) if a != b)
            (_, lp1), (_, lp2) = w.top_logprobs[i][:2]
            assert lp1 - lp2 < 0.05, (name, i, lp1, lp2)  # only a near-tie may flip


def test_drawn_drafts_run_on_cuda_and_greedy_is_exact(tmp_path):
    """Drafts drawn from the draft model's softmax (draft_temperature > 0) go through
    the rejection sampler (on the H100 its inverse-CDF query tensor was once made
    on the CPU for device tensors: a device-mismatch crash; the walk now runs on
    host copies of the distributions, queued from the device in the step's one
    transfer)."""
    from dendrite.speculative import SpeculativeConfig
    from dendrite.tiny_model import build_tiny_model

    d = build_tiny_model(tmp_path / "m", "llama", seed=3)
    want, _, _ = generate(d, torch.float32, None, attention="reference", cuda_graphs=False)
    spec = SpeculativeConfig(method="model", draft_model=str(d), num_draft=4,
                             draft_temperature=0.8)
    got, stats, _ = generate(d, torch.float32, spec, attention="reference", cuda_graphs=False)
    assert stats["spec_steps"] > 0
    assert got[0].token_ids == want[0].token_ids  # the greedy row
    assert all(len(r.token_ids) == 32 for r in got)
