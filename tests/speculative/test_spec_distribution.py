"""Speculative sampling keeps the target distribution: chi-square of the first and
second tokens over many seeded runs on the tiny model, against the exact
distributions computed from the model's logits."""

import math

import pytest
import torch

from dendrite.sampling import SamplingParams
from dendrite.speculative import SpeculativeConfig

scipy_stats = pytest.importorskip("scipy.stats")

PROMPT = "The quick brown fox jumps over the lazy dog. The quick"
TOP_K = 4
RUNS = 400


def exact_topk(engine, ids):
    """The top-k-filtered target distribution after `ids` (token -> prob)."""
    s = engine.new_sequence(ids, add_bos=False)
    r = engine.generate(s, SamplingParams(temperature=0, max_tokens=1, logprobs=TOP_K))[0]
    s.release()
    toks = [t for t, _ in r.top_logprobs[0]]
    p = torch.tensor([lp for _, lp in r.top_logprobs[0]], dtype=torch.float64).exp()
    return dict(zip(toks, (p / p.sum()).tolist()))


def chi2_pvalue(counts, probs):
    keys = sorted(probs)
    observed = [counts.get(k, 0) for k in keys]
    assert sum(observed) == sum(counts.values()), "a token outside the top-k was drawn"
    n = sum(observed)
    expected = [probs[k] * n for k in keys]
    return scipy_stats.chisquare(observed, expected).pvalue


# (0.05: the tiny random model's drafts then land in the target's top-4
# about a third of the time: acceptances and rejections both happen.)
@pytest.mark.parametrize("draft_temperature", [0.0, 0.05], ids=["proposed", "drawn"])
def test_first_and_second_token_distributions(make_engine, target_dir, draft_temperature):
    """Proposed drafts (the draft's best tokens: the walk of the target's draws)
    and drawn drafts (from the draft's softmax: recursive rejection sampling
    against the top-k-filtered target) both leave the target's distribution."""
    e = make_engine(max_batch_tokens=4 * RUNS, num_pages=4 * RUNS, speculative=SpeculativeConfig(
        method="model", draft_model=str(target_dir), num_draft=1, width=2, max_rows=RUNS,
        draft_temperature=draft_temperature))
    prompt_ids = e.encode(PROMPT)
    root = e.new_sequence(prompt_ids, add_bos=False)
    kids = root.fork(RUNS)
    results = e.generate(kids, [SamplingParams(temperature=1.0, top_k=TOP_K, seed=i,
                                               max_tokens=3) for i in range(RUNS)])
    assert e.stats["spec_accepted"] > RUNS // 10  # drafts were accepted, and rejected
    assert e.stats["spec_accepted"] < e.stats["spec_drafted"]
    first = {}
    for r in results:
        first[r.token_ids[0]] = first.get(r.token_ids[0], 0) + 1
    p1 = exact_topk(e, prompt_ids)
    assert chi2_pvalue(first, p1) > 1e-3
    # The second token, given the most frequent first one.
    x1 = max(first, key=first.get)
    second = {}
    for r in results:
        if r.token_ids[0] == x1:
            second[r.token_ids[1]] = second.get(r.token_ids[1], 0) + 1
    p2 = exact_topk(e, prompt_ids + [x1])
    assert chi2_pvalue(second, p2) > 1e-3
    assert not math.isnan(e.stats["spec_mean_accept_len"])
