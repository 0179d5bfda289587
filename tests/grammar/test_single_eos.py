"""The single-EOS path (llguidance < 1.7), exercised on whatever llguidance is installed.

Old llguidance takes one EOS id per tokenizer: the first goes to llguidance and
the others are aliased (allowed exactly where the primary is, consumed as it).
Forcing `LIST_EOS = False` runs that path on a new llguidance too, so CI
covers it without installing an old wheel.
"""

from __future__ import annotations

import json
import random

import pytest
import torch
from grammar_sampling import MODEL_VOCAB
from grammar_schemas import NESTED

from dendrite.grammar import (
    Constraint,
    GrammarTokenizer,
    GrammarViolation,
    fill_masks,
    grammar_status,
    unpack_bitmask,
)
from dendrite.grammar import tokenizer as tokenizer_module
from dendrite.tiny_model import SPECIAL_TOKENS


@pytest.fixture
def extra_id(hf_tokenizer) -> int:
    # A special token stands in for a second EOS (as <|eot_id|> does for Llama 3).
    return hf_tokenizer.token_to_id(SPECIAL_TOKENS[3])


@pytest.fixture
def single(monkeypatch, hf_tokenizer, eos_id, extra_id) -> GrammarTokenizer:
    monkeypatch.setattr(tokenizer_module, "LIST_EOS", False)
    tok = GrammarTokenizer(hf_tokenizer, [eos_id, extra_id], vocab_size=MODEL_VOCAB)
    assert tok.eos_token_ids == (eos_id, extra_id)
    assert tok.extra_eos_token_ids == (extra_id,)
    return tok


def _states(tok: GrammarTokenizer, seed: int, n: int = 40):
    """(tokens so far, matcher, allowed) at `n` states of a random walk through NESTED."""
    rng = random.Random(seed)
    c = Constraint(json_schema=NESTED, json_options={"whitespace_flexible": False})
    m = c.matcher(tok)
    out = []
    tokens: list[int] = []
    while len(out) < n and not m.is_stopped():
        allowed = m.allowed_tokens()
        out.append((list(tokens), m.fork(), allowed))
        non_eos = [t for t in allowed if t not in tok.eos_token_ids]
        # Prefer closing tokens so the walk reaches accepting states.
        closers = [t for t in non_eos if any(ch in tok.decode([t]) for ch in '"}]')]
        pool = closers if closers and rng.random() < 0.6 else non_eos
        if not pool:
            break
        tokens.append(rng.choice(pool))
        m.consume(tokens[-1])
    return out


def test_extra_eos_allowed_exactly_where_the_primary_is(single, eos_id, extra_id):
    states = _states(single, seed=1)
    assert len(states) >= 10
    accepting = 0
    for _, m, allowed in states:
        a = set(allowed)
        assert (eos_id in a) == (extra_id in a) == m.is_accepting(), (allowed, m)
        accepting += m.is_accepting()
    # Prefix states (neither EOS) and accepting states (both) both occur.
    regex = Constraint(regex="[0-9]+").matcher(single)
    assert eos_id not in regex.allowed_tokens() and extra_id not in regex.allowed_tokens()
    regex.consume(single.ll.tokenize_str("4")[0])
    assert {eos_id, extra_id} <= set(regex.allowed_tokens())


def test_batched_masks_alias_per_row(single, eos_id, extra_id):
    c = Constraint(regex="[0-9]+")
    closed, open_ = c.matcher(single), c.matcher(single)
    closed.consume(single.ll.tokenize_str("7")[0])
    for threads in (0, 2):  # the calling thread, llguidance's pool
        bm = single.allocate_bitmask(4, pin_memory=False)
        bm[:] = 0
        fill_masks([open_, closed, open_], bm, rows=[3, 0, 1], threads=threads)
        allowed = unpack_bitmask(bm, single.vocab_size)
        for row, want in ((0, True), (1, False), (3, False)):
            assert bool(allowed[row, eos_id]) == bool(allowed[row, extra_id]) == want
        assert not allowed[2].any()  # unnamed row untouched


def test_consuming_the_extra_eos_finishes_the_matcher(single, extra_id):
    # "no" may go on ("nope"), so EOS is a real choice, not implied by a stop.
    m = Constraint(choices=["no", "nope"]).matcher(single)
    with pytest.raises(GrammarViolation):
        m.fork().consume(extra_id)  # not allowed before a choice is complete
    ids = single.ll.tokenize_str("no")
    assert m.validate_tokens([*ids, extra_id]) == len(ids) + 1
    probe = m.fork()
    assert probe.try_consume([*ids, extra_id]) == len(ids) + 1 and probe.is_stopped()
    m.consume_many(ids)
    m.consume(extra_id)
    assert m.is_stopped() and not m.is_error()
    assert grammar_status(m, "eos") == "complete"
    assert single.decode([*ids, extra_id]) == "no"
    m.rollback(1)  # the aliased EOS counts as one token
    assert m.is_accepting() and not m.is_stopped()


def test_single_eos_masks_equal_list_eos_masks(single, monkeypatch, hf_tokenizer, eos_id, extra_id):
    """Where llguidance takes a list, aliasing must give exactly its masks."""
    if not tokenizer_module._list_eos_supported():
        pytest.skip("installed llguidance takes one EOS id only")
    monkeypatch.setattr(tokenizer_module, "LIST_EOS", True)
    both = GrammarTokenizer(hf_tokenizer, [eos_id, extra_id], vocab_size=MODEL_VOCAB)
    assert both.extra_eos_token_ids == ()
    c = Constraint(json_schema=json.dumps(NESTED), json_options={"whitespace_flexible": False})
    for tokens, _, allowed in _states(single, seed=2):
        twin = c.matcher(both)
        twin.consume_many(tokens)
        assert twin.allowed_tokens() == allowed
    a, b = single.allocate_bitmask(1, pin_memory=False), both.allocate_bitmask(1, pin_memory=False)
    fill_masks([Constraint(regex="").matcher(single)], a)
    fill_masks([Constraint(regex="").matcher(both)], b)
    assert torch.equal(a, b)
