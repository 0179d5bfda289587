"""Constrained generation through the engine: masks in the sampler, forced tokens
as prefill, forks continue their own grammar, bad specs fail before allocation."""

import json
import re

import jsonschema
import pytest
import torch

from dendrite.grammar import Constraint, GrammarError, fill_masks
from dendrite.kernels.config import KernelConfig
from dendrite.sampling import SamplingParams

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "pattern": "^[a-z]{1,8}$"},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "tags": {"type": "array", "items": {"enum": ["math", "engines", "trees"]},
                 "maxItems": 3},
    },
    "required": ["name", "age"],
    "additionalProperties": False,
}


def test_json_schema_batch_all_complete_outputs_validate(make_engine):
    e = make_engine()
    c = Constraint(json_schema=SCHEMA)
    seqs = [e.new_sequence("Person as JSON: ") for _ in range(24)]
    hs = [e.submit(s, SamplingParams(temperature=1.0, seed=i, max_tokens=96), constraint=c)
          for i, s in enumerate(seqs)]
    e.run(hs)
    complete = [h.result for h in hs if h.result.complete]
    assert len(complete) >= 12
    for r in complete:
        jsonschema.validate(json.loads(r.text), SCHEMA)
    for h in hs:
        if not h.result.complete:
            assert h.result.finish_reason == "length"


def test_forced_tokens_run_as_prefill_not_sampling(make_engine):
    e = make_engine()
    c = Constraint(regex=r"The answer is (yes|no)\.")
    h = e.submit(e.new_sequence("Q: is it? A: "), SamplingParams(temperature=0.7, seed=1,
                                                                 max_tokens=32), constraint=c)
    e.run([h])
    assert h.result.complete and re.fullmatch(r"The answer is (yes|no)\.", h.result.text)
    # the forced prefix "The answer is " was appended without sampling, yet carries
    # the model's logprob (see test_engine_forced_logprobs.py)
    assert h.result.logprobs[0] < 0.0


def test_choices_and_fork_continue_grammar(make_engine):
    e = make_engine()
    r = e.generate(e.new_sequence("Pick: "), SamplingParams(temperature=1.0, seed=3,
                                                            max_tokens=16))[0]
    c = Constraint(choices=["red", "green", "blue"])
    s = e.new_sequence("Colour: ")
    h = e.submit(s, SamplingParams(temperature=1.0, seed=3, max_tokens=16), constraint=c)
    e.run([h])
    assert h.result.text in ("red", "green", "blue")
    # cut a JSON array early, fork, and let every branch finish its own copy of the grammar
    schema = {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9},
              "minItems": 4, "maxItems": 4}
    s = e.new_sequence("Digits: ")
    h = e.submit(s, SamplingParams(temperature=1.0, seed=5, max_tokens=3),
                 constraint=Constraint(json_schema=schema,
                                       json_options={"whitespace_flexible": False}))
    e.run([h])
    assert not h.result.complete
    head = h.result.text
    kids = s.fork(4)
    hs = [e.submit(k, SamplingParams(temperature=1.0, seed=20 + i, max_tokens=40),
                   continue_grammar=True) for i, k in enumerate(kids)]
    e.run(hs)
    for k, kh in zip(kids, hs):
        assert kh.result.complete
        full = head + kh.result.text
        jsonschema.validate(json.loads(full), schema)
    assert r.token_ids  # unconstrained request in the same engine still fine


def test_invalid_grammar_rejected_before_allocation(make_engine):
    e = make_engine()
    s = e.new_sequence("x: ")
    used = e.pool.used
    with pytest.raises(GrammarError):
        e.submit(s, SamplingParams(max_tokens=4),
                 constraint=Constraint(json_schema={"type": "object", "properties": {
                     "a": {"type": "integr"}}}))
    assert e.pool.used == used
    with pytest.raises(GrammarError):
        Constraint(regex="(unclosed")


def test_branches_joining_mid_generation_keep_masks_exact(make_engine):
    """Masks of the next step are filled ahead (prefetch); branches that join or
    leave the batch must not shift anyone's mask: a seeded constrained branch
    gives the same tokens alone as with other branches joining mid-way."""
    words = Constraint(regex=r"[a-z ]{30}")
    digits = Constraint(regex=r"[0-9]{3}(-[0-9]{3}){4}")
    params = SamplingParams(temperature=1.0, seed=11, max_tokens=40)

    e = make_engine()
    alone = e.submit(e.new_sequence("Say: "), params, constraint=words)
    e.run([alone])

    e = make_engine()
    a = e.submit(e.new_sequence("Say: "), params, constraint=words)
    for _ in range(3):
        e.step()
    b = e.submit(e.new_sequence("Number: "), SamplingParams(temperature=1.0, seed=2,
                                                            max_tokens=40), constraint=digits)
    free = e.submit(e.new_sequence("Free: "), SamplingParams(temperature=1.0, seed=4,
                                                              max_tokens=12))
    e.step()
    c = e.submit(e.new_sequence("More: "), SamplingParams(temperature=1.0, seed=5,
                                                           max_tokens=40), constraint=words)
    e.run([a, b, c, free])
    assert a.result.token_ids == alone.result.token_ids
    assert re.fullmatch(r"[a-z ]{30}", a.result.text) and a.result.complete
    assert re.fullmatch(r"[a-z ]{30}", c.result.text) and c.result.complete
    assert re.fullmatch(r"[0-9]{3}(-[0-9]{3}){4}", b.result.text) and b.result.complete


def test_inline_masks_equal_worker_masks(make_engine):
    """CUDA engines compute masks on the stepping thread after the launch, CPU
    engines on a worker thread with prefetch: both give the same tokens."""
    c = Constraint(json_schema=SCHEMA)

    def run(inline: bool) -> list[list[int]]:
        e = make_engine()
        e._inline_masks = inline
        root = e.new_sequence("Person as JSON: ")
        kids = root.fork(4)
        hs = [e.submit(k, SamplingParams(temperature=1.0, seed=i, max_tokens=48), constraint=c)
              for i, k in enumerate(kids)]
        e.run(hs)
        return [h.result.token_ids for h in hs]

    assert run(True) == run(False)


@pytest.mark.parametrize("inline", [False, True], ids=["worker", "inline"])
def test_engine_masks_are_fill_masks_of_the_rows_matchers(make_engine, inline):
    """Each step's masks, from either engine path (worker thread with prefetch,
    or the stepping thread after the launch), are exactly `fill_masks` of the
    sampled rows' matchers at that point, -1 rows for unconstrained requests:
    through forks, a request joining mid-run and one leaving."""
    e = make_engine()
    e._inline_masks = inline
    sampler, handles, constrained_rows = e.sampler, {}, []

    def checking_sampler(logits, params, positions, *, prev_tokens=None, allowed=None):
        matchers = [handles[p.seed].matcher for p in params]
        rows = [i for i, m in enumerate(matchers) if m is not None]
        if rows:
            want = e.grammar_tokenizer.allocate_bitmask(len(params), pin_memory=False)
            fill_masks([matchers[i] for i in rows], want, rows)
            assert allowed is not None and torch.equal(allowed, want)
            constrained_rows.append((len(rows), len(params)))
        else:
            assert allowed is None
        return sampler(logits, params, positions, prev_tokens=prev_tokens, allowed=allowed)

    e.sampler = checking_sampler

    def submit(seq, seed, constraint=None, max_tokens=24):
        h = e.submit(seq, SamplingParams(temperature=1.0, seed=seed, max_tokens=max_tokens),
                     constraint=constraint)
        handles[seed] = h
        return h

    c = Constraint(json_schema=SCHEMA)
    hs = [submit(k, i, c) for i, k in enumerate(e.new_sequence("Person as JSON: ").fork(3))]
    hs.append(submit(e.new_sequence("Free: "), 3, max_tokens=6))  # unconstrained row
    for _ in range(3):
        e.step()
    hs.append(submit(e.new_sequence("Another: "), 4, Constraint(regex=r"[a-z ]{20}")))
    e.run(hs)
    assert any(n < total for n, total in constrained_rows)  # mixed steps were checked
    assert max(n for n, _ in constrained_rows) == 4  # and the late request's


def test_grammar_threads_come_from_the_runners_config(make_engine, monkeypatch):
    """KernelConfig.grammar_threads (default from DENDRITE_GRAMMAR_THREADS) sizes
    the llguidance pool of the engine's mask fills; the tokens do not change."""
    c = Constraint(json_schema=SCHEMA)

    def run(e) -> list[list[int]]:
        hs = [e.submit(k, SamplingParams(temperature=1.0, seed=i, max_tokens=32), constraint=c)
              for i, k in enumerate(e.new_sequence("Person as JSON: ").fork(4))]
        e.run(hs)
        return [h.result.token_ids for h in hs]

    one = make_engine()
    monkeypatch.setenv("DENDRITE_GRAMMAR_THREADS", "2")
    pooled = make_engine()
    assert run(pooled) == run(one)
    assert (one._masks.threads, pooled._masks.threads) == (0, 2)
    assert make_engine(kernels=KernelConfig(grammar_threads=3))._masks.threads == 3
