"""The same model code on a CUDA device with the reference backend (skipped without one).

fp32 on the GPU must give transformers' greedy tokens too, the fork test must
hold there, and the seeded sampler must draw the same tokens on CPU and GPU
(its noise is integer arithmetic, so only the float log differs, by an ulp).
"""

from __future__ import annotations

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.mark.parametrize("variant", ["llama3_rope_mha_bf16", "qwen3", "mistral_sliding"])
def test_greedy_matches_transformers_on_cuda(variant, tmp_path):
    from test_hf_golden import PROMPTS, VARIANTS, dendrite_greedy, hf_greedy

    from dendrite.model.runner import ModelRunner
    from dendrite.tiny_model import build_tiny_model

    d = build_tiny_model(tmp_path / variant, **VARIANTS[variant])
    runner = ModelRunner(
        d, device="cuda", dtype="float32", num_pages=256, page_size=4, attention="reference"
    )
    tok = runner.tokenizer
    prompts = [[tok.bos_token_id] + tok.encode(p) for p in PROMPTS]
    expected = hf_greedy(d, prompts)  # CPU, fp32
    got = dendrite_greedy(runner, prompts)
    for (hf_ids, hf_logits), (ids, lg) in zip(expected, got):
        assert ids == hf_ids
        rel = ((lg.cpu() - hf_logits).abs().amax(-1) / hf_logits.abs().amax(-1)).max().item()
        assert rel < 1e-4


def test_fork_consistency_on_cuda(tmp_path):
    import test_fork_consistency as t

    from dendrite.model.runner import ModelRunner
    from dendrite.tiny_model import build_tiny_model

    d = build_tiny_model(tmp_path / "f", "qwen3", seed=21)
    runner = ModelRunner(
        d, device="cuda", dtype="float32", num_pages=512, page_size=t.PAGE, attention="reference"
    )
    t.test_branches_reproduce_unforked_run(runner)


def test_sampler_draws_match_cpu():
    from dendrite.sampling import SamplingParams, gumbel_noise, row_keys, sample

    keys = row_keys(range(8), range(8))
    torch.testing.assert_close(
        gumbel_noise(keys, 5000, "cuda").cpu(),
        gumbel_noise(keys, 5000, "cpu"),
        rtol=1e-6,
        atol=1e-6,
    )
    x = torch.randn(256, 1000, generator=torch.Generator().manual_seed(0)) * 3
    params = [
        SamplingParams(temperature=0.9, top_k=50, top_p=0.95, min_p=0.01, seed=s)
        for s in range(256)
    ]
    cpu = sample(x, params, list(range(256))).token_ids
    gpu = sample(x.cuda(), params, list(range(256))).token_ids.cpu()
    assert (cpu == gpu).float().mean() > 0.99
