"""Speculative output is the target's, token for token: greedy and seeded sampling,
n-gram and draft-model drafters, chains and trees, forks, grammars."""

import pytest

from dendrite.grammar import Constraint
from dendrite.sampling import SamplingParams
from dendrite.speculative import SpeculativeConfig

REPEAT = ("The quick brown fox jumps over the lazy dog. def fork(node, n): return "
          "[child(node) for _ in range(n)] The quick brown fox jumps over the lazy dog. def fork(")


def run(engine, prompt, params, n=1):
    root = engine.new_sequence(prompt)
    seqs = [root] if n == 1 else root.fork(n)
    params = params if isinstance(params, list) else [params] * n
    return [r.token_ids for r in engine.generate(seqs, params)]


def spec_stats(e):
    return {k: v for k, v in e.stats.items() if k.startswith("spec")}


CONFIGS = {
    "ngram-chain": {"method": "ngram", "num_draft": 4},
    "ngram-width3": {"method": "ngram", "num_draft": 3, "width": 3},
    "ngram-dynamic": {"method": "ngram", "tree": "dynamic", "top_k": 2, "budget": 6,
                      "num_draft": 4},
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_ngram_greedy_equals_plain(make_engine, name):
    p = SamplingParams(temperature=0, max_tokens=24)
    want = run(make_engine(), REPEAT, p)
    e = make_engine(speculative=SpeculativeConfig(**CONFIGS[name]))
    assert run(e, REPEAT, p) == want
    st = spec_stats(e)
    assert st["spec_steps"] > 0 and st["spec_drafted"] > 0
    assert st["spec_mean_accept_len"] >= 1.0


@pytest.mark.parametrize("tree", ["static", "dynamic"])
def test_model_drafter_self_and_random_equal_plain(make_engine, target_dir, other_dir, tree):
    """The target drafting for itself is accepted almost always; another random
    model almost never: both give the plain run's tokens."""
    p = SamplingParams(temperature=0, max_tokens=20)
    prompt = "Question: Natalia sold clips"
    want = run(make_engine(), prompt, p)
    good = make_engine(speculative=SpeculativeConfig(method="model", draft_model=str(target_dir),
                                                     tree=tree, num_draft=4))
    assert run(good, prompt, p) == want
    assert good.stats["spec_mean_accept_len"] > 3.0
    bad = make_engine(speculative=SpeculativeConfig(method="model", draft_model=str(other_dir),
                                                    tree=tree, num_draft=3, width=2))
    assert run(bad, prompt, p) == want
    assert bad.stats["spec_accepted"] <= bad.stats["spec_rows"]  # (nearly) nothing accepted


def test_forks_speculate_in_one_batch_with_seeds(make_engine, target_dir):
    """Greedy and seeded branches of one fork, each speculating, in the same
    steps: every branch gets exactly its plain-run tokens."""
    params = [SamplingParams(temperature=0, max_tokens=16)] + [
        SamplingParams(temperature=0.7, seed=s, max_tokens=16) for s in range(5)]
    want = run(make_engine(), REPEAT, params, n=6)
    e = make_engine(speculative=SpeculativeConfig(method="model", draft_model=str(target_dir),
                                                  width=2, num_draft=3))
    assert run(e, REPEAT, params, n=6) == want
    assert e.stats["spec_rows"] > e.stats["spec_steps"]  # several branches per step


def test_steps_launched_ahead_between_speculative_ones(make_engine, other_dir):
    """With lookahead (the CUDA default) a paused branch's plain steps are
    launched ahead, and speculative steps come in between: same tokens."""
    params = [SamplingParams(temperature=0, max_tokens=24)] + [
        SamplingParams(temperature=0.7, seed=s, max_tokens=24) for s in range(3)]
    want = run(make_engine(), REPEAT, params, n=4)
    e = make_engine(lookahead=True, speculative=SpeculativeConfig(
        method="model", draft_model=str(other_dir), num_draft=2, probe_every=3))
    assert run(e, REPEAT, params, n=4) == want
    assert e.stats["lookahead_steps"] > 0 and e.stats["spec_steps"] > 1


def test_forked_branch_draws_what_an_unforked_run_draws(make_engine):
    p = SamplingParams(temperature=0.9, seed=7, max_tokens=16)
    e = make_engine(speculative=SpeculativeConfig(num_draft=3, width=2))
    alone = run(e, REPEAT, p)[0]
    kids = run(e, REPEAT, p, n=3)
    assert kids == [alone] * 3


def test_grammar_prunes_drafts_and_output_is_unchanged(make_engine):
    """The n-gram drafter proposes the prompt's words; the grammar forbids most:
    drafts are pruned before verification and the result is the plain one."""
    c = Constraint(regex=r"( (quick|brown|lazy|dog|fox)){3,8}\.")
    prompt = "The quick brown fox jumps over the lazy dog. The quick brown dog"
    outs = []
    for spec in (None, SpeculativeConfig(num_draft=4, width=2)):
        e = make_engine(speculative=spec)
        res = []
        for seed in range(3):
            s = e.new_sequence(prompt)
            h = e.submit(s, SamplingParams(temperature=0.8 if seed else 0, seed=seed,
                                           max_tokens=30), constraint=c)
            e.run([h])
            assert h.result.complete
            res.append(h.result.token_ids)
            s.release()
        outs.append(res)
    assert outs[0] == outs[1]


def test_logprobs_and_stops_match(make_engine):
    p = SamplingParams(temperature=0, max_tokens=30, logprobs=3, stop=" lazy")
    e0 = make_engine()
    r0 = e0.generate(e0.new_sequence(REPEAT), p)[0]
    e1 = make_engine(speculative=SpeculativeConfig(num_draft=5))
    r1 = e1.generate(e1.new_sequence(REPEAT), p)[0]
    assert r1.token_ids == r0.token_ids and r1.text == r0.text
    assert r1.finish_reason == r0.finish_reason
    assert r1.logprobs == pytest.approx(r0.logprobs, abs=1e-4)
    assert [[t for t, _ in top] for top in r1.top_logprobs] == \
        [[t for t, _ in top] for top in r0.top_logprobs]


def test_drawn_drafts_are_reproducible_and_greedy_exact(make_engine, target_dir):
    """Drafts drawn from the draft's softmax: seeded branches get the same tokens
    run after run (two with one seed in one batch: the same tokens), and a
    greedy branch still gets exactly the plain run's (its verification is the
    walk of argmax draws). Sampled tokens are the target's distribution
    (test_spec_distribution.py), not the plain run's tokens."""
    spec = SpeculativeConfig(method="model", draft_model=str(target_dir), num_draft=3,
                             width=2, draft_temperature=0.5)
    sampled = SamplingParams(temperature=0.9, seed=5, max_tokens=16)
    greedy = SamplingParams(temperature=0, max_tokens=16)
    params = [sampled, greedy, sampled]
    first = make_engine(speculative=spec)
    a = run(first, REPEAT, params, n=3)
    b = run(make_engine(speculative=spec), REPEAT, params, n=3)
    assert a == b and a[0] == a[2]
    assert a[1] == run(make_engine(), REPEAT, greedy)[0]
    assert first.stats["spec_accepted"] > 0
