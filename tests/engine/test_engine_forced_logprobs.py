"""Tokens appended without sampling (grammar-forced ones, `submit_score`) get the
model's logprobs, from the forward that consumes them, equal to HF
transformers' log_softmax at each generated position (fp32 on the CPU)."""

import math
import re

import pytest
import torch

from dendrite.grammar import Constraint
from dendrite.sampling import SamplingParams

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

ATOL = 1e-4


@pytest.fixture(scope="module")
def hf_logprobs(tiny_model_dir):
    """ids -> float32 [len(ids), V] log_softmax of HF's next-token logits per prefix."""
    hf = transformers.AutoModelForCausalLM.from_pretrained(tiny_model_dir,
                                                           dtype=torch.float32).eval()

    def run(ids: list[int]) -> torch.Tensor:
        with torch.no_grad():
            return torch.log_softmax(hf(torch.tensor([ids])).logits[0].float(), -1)

    return run


def assert_matches_hf(hf_logprobs, seq_tokens: list[int], result, n_top: int = 0) -> None:
    """Every generated token's logprob (and top-n) equals HF's at its position."""
    n = len(result.token_ids)
    assert seq_tokens[len(seq_tokens) - n:] == result.token_ids
    ref = hf_logprobs(seq_tokens)
    start = len(seq_tokens) - n
    want = torch.stack([ref[start + i - 1, t] for i, t in enumerate(result.token_ids)])
    torch.testing.assert_close(torch.tensor(result.logprobs), want, atol=ATOL, rtol=0)
    if n_top:
        assert len(result.top_logprobs) == n
        for i, top in enumerate(result.top_logprobs):
            want_lp, want_ids = ref[start + i - 1].topk(n_top)
            assert [t for t, _ in top] == want_ids.tolist()
            torch.testing.assert_close(torch.tensor([x for _, x in top]), want_lp,
                                       atol=ATOL, rtol=0)


def forced_count(e, constraint: Constraint, token_ids: list[int]) -> int:
    """How many of `token_ids` the grammar forced (replayed on a fresh matcher)."""
    m = constraint.matcher(e.grammar_tokenizer)
    forced, i = 0, 0
    while i < len(token_ids):
        ff = m.forced_tokens()
        if ff:
            assert token_ids[i:i + len(ff)] == ff[:len(token_ids) - i]
            forced += min(len(ff), len(token_ids) - i)
            m.consume_many(ff[:len(token_ids) - i])
            i += len(ff)
        else:
            m.consume(token_ids[i])
            i += 1
    return forced


CASES = [
    ("regex", {"regex": r"The answer is (yes|no)\. Banana Republic of Zanzibar"}),
    ("choices", {"choices": [" Banana Republic of Zanzibar", " Apple pie with cream",
                             " Zebra crossing"]}),
]


@pytest.mark.parametrize("kind,spec", CASES, ids=[c[0] for c in CASES])
def test_forced_token_logprobs_equal_hf(make_engine, hf_logprobs, kind, spec):
    e = make_engine()
    c = Constraint(**spec)
    for seed in range(3):
        s = e.new_sequence("Q: where? A:")
        steps0 = e.stats["steps"]
        h = e.submit(s, SamplingParams(temperature=1.0, seed=seed, max_tokens=40, logprobs=3),
                     constraint=c)
        e.run([h])
        r = h.result
        assert r.complete, r
        forced = forced_count(e, c, r.token_ids)
        assert forced >= 3, f"{kind}: the grammar forced only {forced} tokens"
        assert all(lp < 0.0 and math.isfinite(lp) for lp in r.logprobs)
        assert_matches_hf(hf_logprobs, s.tokens, r, n_top=3)
        # Forced tokens ride along the step of the tokens around them: at most
        # one forward per sampled token, plus the one scoring a forced tail.
        sampled = len(r.token_ids) - forced
        assert e.stats["steps"] - steps0 <= sampled + 1
        s.release()


def test_forced_logprobs_with_chunked_prefill(make_engine, hf_logprobs):
    """Forced tokens split over several prefill chunks are all scored."""
    e = make_engine(max_batch_tokens=3)
    c = Constraint(regex=r"The answer is (yes|no)\. Banana Republic of Zanzibar and more")
    s = e.new_sequence("Q: where? A:")
    h = e.submit(s, SamplingParams(temperature=1.0, seed=1, max_tokens=40), constraint=c)
    e.run([h])
    assert h.result.complete and re.fullmatch(r"The answer is (yes|no)\..*", h.result.text)
    assert_matches_hf(hf_logprobs, s.tokens, h.result)


def test_forked_branch_gets_the_unforked_logprobs(make_engine):
    e = make_engine()
    c = Constraint(choices=[" Banana Republic of Zanzibar", " Apple pie with cream"])
    params = SamplingParams(temperature=1.0, seed=7, max_tokens=40, logprobs=2)
    alone = e.new_sequence("Q: where? A:")
    ha = e.submit(alone, params, constraint=c)
    e.run([ha])
    parent = e.new_sequence("Q: where? A:")
    kids = parent.fork(3)
    hs = [e.submit(k, params, constraint=c) for k in kids]
    e.run(hs)
    for h in hs:
        assert h.result.token_ids == ha.result.token_ids
        torch.testing.assert_close(torch.tensor(h.result.logprobs),
                                   torch.tensor(ha.result.logprobs), atol=ATOL, rtol=0)
        assert [[t for t, _ in top] for top in h.result.top_logprobs] == \
            [[t for t, _ in top] for top in ha.result.top_logprobs]


def test_submit_score_batches_continuations_in_one_step(make_engine, hf_logprobs):
    e = make_engine()
    parent = e.new_sequence("Q: the capital? A:")
    conts = [" Banana Republic of Zanzibar", " Paris", " a very long answer that goes on"]
    kids = parent.fork(len(conts))
    steps0 = e.stats["steps"]
    hs = [e.submit_score(k, e.encode(t, add_bos=False), logprobs=2)
          for k, t in zip(kids, conts)]
    e.run(hs)
    assert e.stats["steps"] - steps0 == 1  # every continuation, every token: one forward
    for k, h in zip(kids, hs):
        assert h.result.finish_reason == "scored" and h.result.complete
        assert_matches_hf(hf_logprobs, k.tokens, h.result, n_top=2)
    # The branches keep the tokens and generate on from them.
    r = e.generate(kids[0], SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True))[0]
    assert_matches_hf(hf_logprobs, kids[0].tokens, r)


def test_submit_score_errors_name_the_argument(make_engine):
    e = make_engine()
    s = e.new_sequence("Hi")
    with pytest.raises(ValueError, match="at least one token"):
        e.submit_score(s, [])
    with pytest.raises(ValueError, match="logprobs"):
        e.submit_score(s, [5], logprobs=-1)
    with pytest.raises(ValueError, match="empty"):
        e.submit_score(e.new_sequence(None), [5])
    assert s.tokens == e.encode("Hi")  # a rejected call changed nothing


def test_cancelled_before_scoring_reports_nan_and_leaks_nothing(make_engine):
    e = make_engine()
    s = e.new_sequence("Q: where? A:")
    h = e.submit_score(s, e.encode(" Banana Republic", add_bos=False))
    assert not h.done  # waits for the forward that scores it
    assert e.cancel(h)
    assert h.result.finish_reason == "abort"
    assert all(math.isnan(lp) for lp in h.result.logprobs)
    # The branch is usable: generating on it scores from where it stands.
    r = e.generate(s, SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True))[0]
    assert all(math.isfinite(lp) for lp in r.logprobs)
