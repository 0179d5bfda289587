"""The CUDA engine launches steady decode steps ahead (GPU): tokens are fed on
the device into the CUDA graphs (flat and cascade), and every token, logprob
and page equals a synchronously stepped engine's."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.mark.parametrize("cascade", ["never", "always"])
def test_lookahead_equals_sync_on_cuda(tmp_path, cascade):
    pytest.importorskip("flashinfer")
    from dendrite.engine import Engine
    from dendrite.sampling import SamplingParams
    from dendrite.tiny_model import build_tiny_model

    d = build_tiny_model(tmp_path / "m", "llama", seed=4, hidden_size=256, heads=4, kv_heads=2,
                         num_layers=2, dtype="bfloat16")
    prompt = list(range(5, 300))  # 18 full pages shared by the branches

    def run(lookahead: bool):
        e = Engine(d, device="cuda", dtype=torch.bfloat16, num_pages=512, page_size=16,
                   cascade=cascade, lookahead=lookahead, prefix_cache=False)
        root = e.new_sequence(prompt)
        kids = root.fork(6)
        params = [SamplingParams(temperature=0.0 if i % 2 else 1.0, seed=i, max_tokens=20 + i,
                                 ignore_eos=True, stop_token_ids=[7] if i == 2 else ())
                  for i in range(6)]
        res = e.generate(kids, params)
        more = e.generate(kids[0].fork(2), SamplingParams(temperature=1.0, seed=9,
                                                          max_tokens=12, ignore_eos=True))
        out = [(r.token_ids, r.logprobs) for r in res + more]
        stats = dict(e.stats)
        e.close()
        return out, stats

    want, sync_stats = run(False)
    got, stats = run(True)
    assert stats["lookahead_steps"] > 10 and sync_stats["lookahead_steps"] == 0
    for (wt, wl), (gt, gl) in zip(want, got):
        assert gt == wt
        np.testing.assert_allclose(gl, wl, atol=1e-4)
