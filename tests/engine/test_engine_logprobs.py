"""`GenResult.top_logprobs`: per generated token, the n most likely tokens and
their logprobs under the model, against log_softmax(...).topk of HF's logits."""

import re

import pytest
import torch

from dendrite.grammar import Constraint
from dendrite.sampling import SamplingParams

transformers = pytest.importorskip("transformers")


def hf_logits(model_dir, ids: list[int]) -> torch.Tensor:
    """float32 [len(ids), V] next-token logits of HF transformers for each prefix."""
    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0].float()


def test_top_logprobs_are_the_models_best_tokens(make_engine, tiny_model_dir):
    e = make_engine()
    params = [SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, logprobs=3),
              SamplingParams(temperature=1.0, seed=5, max_tokens=12, ignore_eos=True, logprobs=5,
                             top_k=40),
              SamplingParams(temperature=0.8, seed=6, max_tokens=12, ignore_eos=True)]
    prompts = ["The quick brown fox", "Question: Natalia sold", "Once upon"]
    seqs = [e.new_sequence(p) for p in prompts]
    results = e.generate(seqs, params)
    assert results[2].top_logprobs is None  # not asked for
    for seq, p, r in zip(seqs[:2], params[:2], results[:2]):
        n_prompt = len(seq.tokens) - len(r.token_ids)
        ref = torch.log_softmax(hf_logits(tiny_model_dir, seq.tokens), -1)
        assert len(r.top_logprobs) == len(r.token_ids) == 12
        for i, (tok, lp, top) in enumerate(zip(r.token_ids, r.logprobs, r.top_logprobs)):
            want_lp, want_ids = ref[n_prompt + i - 1].topk(p.logprobs)
            assert [t for t, _ in top] == want_ids.tolist()
            torch.testing.assert_close(torch.tensor([x for _, x in top]), want_lp,
                                       atol=1e-4, rtol=1e-4)
            assert all(isinstance(t, int) and isinstance(x, float) for t, x in top)
            if tok in dict(top):  # the chosen token's own logprob agrees
                assert abs(dict(top)[tok] - lp) < 1e-4
        if p.temperature == 0.0:
            assert [top[0][0] for top in r.top_logprobs] == r.token_ids


def test_forced_tokens_report_the_models_alternatives(make_engine):
    e = make_engine()
    c = Constraint(regex=r"The answer is (yes|no)\.")
    h = e.submit(e.new_sequence("Q: is it? A: "),
                 SamplingParams(temperature=0.7, seed=1, max_tokens=32, logprobs=2), constraint=c)
    e.run([h])
    r = h.result
    assert r.complete and re.fullmatch(r"The answer is (yes|no)\.", r.text)
    assert len(r.top_logprobs) == len(r.token_ids)
    # Forced tokens (not sampled) list the model's alternatives like sampled
    # ones (values against HF: test_engine_forced_logprobs.py).
    assert all(len(top) == 2 for top in r.top_logprobs)
    assert r.logprobs[0] < 0.0

    # A request ending on EOS drops the EOS token and its alternatives together.
    probe = e.generate(e.new_sequence("Once upon"),
                       SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))[0]
    e.eos_token_ids.add(probe.token_ids[2])
    try:
        r = e.generate(e.new_sequence("Once upon"),
                       SamplingParams(temperature=0, max_tokens=8, logprobs=4))[0]
    finally:
        e.eos_token_ids.discard(probe.token_ids[2])
    assert r.finish_reason == "eos" and r.token_ids == probe.token_ids[:2]
    assert len(r.top_logprobs) == 2 and all(len(top) == 4 for top in r.top_logprobs)


def test_handle_collects_top_logprobs_as_it_goes(make_engine):
    e = make_engine()
    h = e.submit(e.new_sequence("The quick brown fox"),
                 SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, logprobs=2))
    while len(h.token_ids) < 3:
        e.step()
    assert len(h.top_logprobs) == len(h.token_ids)
    assert [top[0][0] for top in h.top_logprobs] == h.token_ids
    e.run([h])
    assert h.result.top_logprobs == h.top_logprobs
