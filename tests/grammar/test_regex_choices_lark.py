"""Regex, choice and lark constraints over random logits.

Regex outputs must fullmatch with Python `re`, choices must return a member,
lark outputs must parse with the `lark` package, and a cut generation that
happens to match is still reported incomplete.
"""

from __future__ import annotations

import re
import zlib

import pytest
from lark import Lark

from dendrite.grammar import Constraint, grammar_status

REGEXES = [
    r"[0-9]{3}-[0-9]{4}",
    r"(yes|no|maybe)",
    r"[a-z]{1,8}@[a-z]{1,8}\.com",
    r"-?(0|[1-9][0-9]{0,5})(\.[0-9]{1,3})?",
    r"(ab|cd)*e",
    r"[A-Z][a-z]{0,5}( [A-Z][a-z]{0,5}){0,2}",
    # [0-9], not \d: Rust's Unicode \d knows newer digits than Python 3.11's re.
    r"\([0-9]+ [+*-] [0-9]+\)",
    r"[^\n\"]{0,10}\n",
]


@pytest.mark.parametrize("pattern", REGEXES)
def test_regex_outputs_fullmatch(sample, gtok, pattern):
    c = Constraint(regex=pattern)
    gens = sample(c, 40, seed=zlib.crc32(pattern.encode()), max_tokens=64)
    complete = 0
    for g in gens:
        text = gtok.decode(g.tokens)
        if g.status == "complete":
            complete += 1
            assert re.fullmatch(pattern, text), (pattern, text)
        else:
            assert g.finish == "length"
    assert complete >= 30, f"{pattern}: {complete}/40 complete"


CHOICES = ["yes", "no", "no way", "maybe", 'a "quoted" \\ choice\n', "é", "  spaced  "]


def test_choices_return_a_member(sample, gtok):
    c = Constraint(choices=CHOICES)
    gens = sample(c, 200, seed=3, max_tokens=32)
    seen = set()
    for g in gens:
        assert g.status == "complete" and g.finish == "eos"
        text = gtok.decode(g.tokens)
        assert text in CHOICES, text
        seen.add(text)
    # Random logits should reach most members, including the prefix pair.
    assert {"no", "no way"} <= seen and len(seen) >= 5, seen


def test_duplicate_choices_are_fine(gtok):
    c = Constraint(choices=["a", "a", "b"])
    m = c.matcher(gtok)
    assert sorted(gtok.decode([t]) for t in m.allowed_tokens()) == ["a", "b"]


ARITH = r"""
start: expr
expr: term (("+" | "-") term)*
term: factor (("*" | "/") factor)*
factor: NUMBER | "(" expr ")"
NUMBER: /[0-9]{1,3}/
"""


def test_lark_outputs_parse(sample, gtok):
    parser = Lark(ARITH, start="start")
    c = Constraint(grammar=ARITH)
    gens = sample(c, 100, seed=11, max_tokens=48)
    complete = 0
    for g in gens:
        text = gtok.decode(g.tokens)
        if g.status == "complete":
            complete += 1
            parser.parse(text)
        else:
            assert g.finish == "length"
    assert complete >= 60, complete


def test_cut_regex_match_is_incomplete(sample, gtok):
    """`[0-9]+` cut by max_tokens matches, yet was truncated: incomplete."""
    pattern = "[0-9]+"
    gens = sample(Constraint(regex=pattern), 30, seed=5, max_tokens=3, bias_strength=-20.0)
    for g in gens:
        text = gtok.decode(g.tokens)
        if g.finish == "length":
            assert re.fullmatch(pattern, text)  # valid so far ...
            assert g.status == "incomplete"  # ... but cut, so never reported valid
    assert sum(g.finish == "length" for g in gens) >= 20


def test_length_cut_of_finished_grammar_is_complete(sample, gtok):
    """Cut exactly when the grammar cannot continue: nothing was lost."""
    c = Constraint(regex="ab")
    m = c.matcher(gtok)
    m.consume_many(m.forced_tokens())
    assert m.is_stopped() and m.is_accepting()
    assert grammar_status(m, "length") == "complete"
    assert grammar_status(m, "eos") == "complete"
