"""Forked matchers: each child continues the grammar from the fork point.

Branches fork mid-generation and continue with their own random draws; every
complete branch must still validate, children must not disturb each other or
the parent, and rollback must restore the state it undid.
"""

from __future__ import annotations

import json

import jsonschema
import torch
from grammar_sampling import Gen, closing_bias, run
from grammar_schemas import BOUNDED, NESTED, POINTS

from dendrite.grammar import Constraint


def _check_json(gens, gtok, schema):
    complete = 0
    for g in gens:
        if g.status == "complete":
            complete += 1
            jsonschema.validate(json.loads(gtok.decode(g.tokens)), schema)
        else:
            assert g.finish == "length"
    return complete


def test_forked_json_branches_stay_valid(gtok):
    """24 parents fork into 4 children each, at three different depths."""
    for schema, fork_at, seed in ((NESTED, 6, 1), (POINTS, 3, 2), (BOUNDED, 10, 3)):
        c = Constraint(json_schema=schema, json_options={"whitespace_flexible": False})
        gens = [Gen(c.matcher(gtok)) for _ in range(24)]
        out = run(
            gens,
            gtok,
            torch.Generator().manual_seed(seed),
            max_tokens=160,
            bias=closing_bias(gtok, 1.5),
            fork_at=fork_at,
            fork_n=4,
        )
        assert len(out) >= 60  # at least half the parents were still running at the fork
        assert _check_json(out, gtok, schema) >= 0.8 * len(out)


def test_forked_regex_branches_diverge_and_stay_valid(gtok):
    import re

    pattern = r"[a-z]{2,6}(-[a-z]{2,6}){1,3}"
    c = Constraint(regex=pattern)
    gens = [Gen(c.matcher(gtok)) for _ in range(10)]
    out = run(gens, gtok, torch.Generator().manual_seed(9), max_tokens=64, fork_at=2, fork_n=5)
    texts = [gtok.decode(g.tokens) for g in out if g.status == "complete"]
    assert len(texts) >= 40
    for t in texts:
        assert re.fullmatch(pattern, t), t
    assert len(set(texts)) > len(texts) // 2  # children drew differently


def test_fork_is_independent(gtok):
    c = Constraint(choices=["alpha", "beta", "gamma"])
    parent = c.matcher(gtok)
    a_tok = gtok.ll.tokenize_str("a")[0]
    b_tok = gtok.ll.tokenize_str("b")[0]
    left, right = parent.fork_many(2)
    left.consume(a_tok)
    right.consume(b_tok)
    # The parent is untouched and still offers every choice.
    assert parent.num_tokens == 0
    assert {a_tok, b_tok} <= set(parent.allowed_tokens())
    assert gtok.decode(left.forced_tokens()).startswith(
        "lpha"[: len(gtok.decode(left.forced_tokens()))]
    )
    left.consume_many(left.forced_tokens())
    right.consume_many(right.forced_tokens())
    # Each branch finishes its own word.
    assert left.is_accepting() and right.is_accepting()
    assert left.allowed_tokens() == list(gtok.eos_token_ids)


def test_rollback_restores_state(gtok):
    c = Constraint(json_schema=NESTED, json_options={"whitespace_flexible": False})
    m = c.matcher(gtok)
    m.consume_many(m.forced_tokens())
    before = m.allowed_tokens()
    ids = gtok.ll.tokenize_str('12,"address":{"zip":"1')
    m.consume_many(ids)
    assert m.allowed_tokens() != before
    m.rollback(len(ids))
    assert m.allowed_tokens() == before
    assert m.num_tokens == len(c.matcher(gtok).forced_tokens())
