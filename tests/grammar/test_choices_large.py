"""Large choice lists: thousands of members, shared prefixes, regex metacharacters.

Choices used to be alternatives of the start rule, one Earley item each, and
llguidance allows 2000 items in a row: past ~2000 choices a generation failed
mid-way with "Current row has 2001 items". They are one lexeme now.
"""

from __future__ import annotations

import random
import time

import pytest

from dendrite.grammar import Constraint, GrammarError

_META = ".*+?()[]{}|^$\\/\"'\n\t"
# Always members: literal metacharacters, and a prefix chain.
_FIXED = ["[0-9]+", "a.b", "(x|y)", "item", "item 1", "item 12"]


def _choices(n: int, seed: int) -> list[str]:
    """`n` distinct choices: chains of shared prefixes, metacharacters, non-ASCII."""
    rng = random.Random(seed)
    out: dict[str, None] = dict.fromkeys(_FIXED)
    stems = ["item", "a.b", "a\\.b", "(x|y)", "[0-9]+", "ünï", '"q"', "$^"]
    while len(out) < n:
        kind = rng.randrange(4)
        if kind == 0:  # a prefix chain: "item", "item 1", "item 12", ...
            s = rng.choice(stems)
            for _ in range(rng.randrange(1, 5)):
                out[s] = None
                s += rng.choice([" ", "", "."]) + str(rng.randrange(100))
        elif kind == 1:
            out["".join(rng.choice(_META) for _ in range(rng.randrange(1, 8)))] = None
        elif kind == 2:
            out[f"{rng.choice(stems)}{rng.randrange(10**6)}"] = None
        else:
            text = "".join(chr(rng.randrange(0x20, 0x250)) for _ in range(rng.randrange(1, 12)))
            out[text] = None
    return list(out)[:n]


@pytest.mark.parametrize("n", [5000, 20000])
def test_large_choice_lists_generate_members(sample, gtok, n):
    choices = _choices(n, seed=n)
    assert len(set(choices)) == n
    t0 = time.perf_counter()
    c = Constraint(choices=choices)
    c.compile(gtok)
    build_s = time.perf_counter() - t0
    members = set(choices)
    gens = sample(c, 40, seed=n, max_tokens=64)
    for g in gens:
        text = gtok.decode(g.tokens)
        assert g.finish == "eos" and g.status == "complete", (text, g.finish)
        assert text in members, text
    print(f"{n} choices: constraint + compile {build_s:.2f} s")


def test_every_member_and_only_members_are_accepted(gtok):
    choices = _choices(5000, seed=1)
    members = set(choices)
    c = Constraint(choices=choices)
    eos = gtok.eos_token_ids[0]
    rng = random.Random(2)
    # Members sharing a prefix with others, and ones full of metacharacters.
    picked = rng.sample(choices, 300) + [s for s in choices if s.startswith(("item", "a.b"))][:50]
    for s in picked:
        ids = gtok.ll.tokenize_str(s)
        assert c.matcher(gtok).validate_tokens([*ids, eos]) == len(ids) + 1, repr(s)
    rejected = 0
    for s in picked:
        for bad in (s + "\x01", "\x01" + s, s[:-1] + "\x02"):
            if bad in members:
                continue
            ids = gtok.ll.tokenize_str(bad)
            assert c.matcher(gtok).validate_tokens([*ids, eos]) < len(ids) + 1, repr(bad)
            rejected += 1
    assert rejected > 500
    # Metacharacters are literal: "[0-9]+" and "a.b" are members, "7" and "aXb" are not.
    cases = {"[0-9]+": True, "a.b": True, "(x|y)": True, "7": False, "aXb": False, "x": False}
    for s, ok in cases.items():
        assert (s in members) == ok
        ids = gtok.ll.tokenize_str(s)
        assert (c.matcher(gtok).validate_tokens([*ids, eos]) == len(ids) + 1) == ok, s
    # A prefix chain: after "item 1" both EOS and "2" may follow.
    m = c.matcher(gtok)
    m.consume_many(gtok.ll.tokenize_str("item 1"))
    assert m.is_accepting() and not m.is_stopped()


def test_empty_string_is_a_choice(gtok):
    m = Constraint(choices=["", "ab", "abc"]).matcher(gtok)
    assert m.is_accepting()  # "" is complete already
    ab = gtok.ll.tokenize_str("ab")
    m.consume_many(ab)
    assert m.is_accepting() and not m.is_stopped()  # "abc" may follow
    assert set(m.allowed_tokens()) == {gtok.eos_token_ids[0], *gtok.ll.tokenize_str("c")}


def test_choice_that_is_not_unicode_text_is_named():
    with pytest.raises(GrammarError, match=r"choices\[1\] is not valid Unicode") as ei:
        Constraint(choices=["ok", "bad \ud800"])
    assert ei.value.kind == "choices"


def test_too_many_choices_name_the_limit():
    """Past llguidance's lexer limit: one line naming the limit, no echoed grammar."""
    choices = [str(i) for i in range(100_000)]
    with pytest.raises(GrammarError) as ei:
        Constraint(choices=choices)
    msg = str(ei.value)
    assert "100000 choices" in msg and "limit" in msg and "1000000" in msg
    assert "\n" not in msg and len(msg) < 400
