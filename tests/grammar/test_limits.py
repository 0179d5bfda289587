"""llguidance running out of a resource limit mid-generation ends that generation, nothing more.

A token the mask allowed can still fail in llguidance when its lexer runs out
of fuel. That is not a caller bug (GrammarViolation) and must not fail the
engine step: the matcher stays in the error state (masks allow only EOS),
the output is reported incomplete, and the exhausted compiled grammar is
dropped from the cache so later requests start from a fresh one.
"""

from __future__ import annotations

import pytest

from dendrite.grammar import Constraint, GrammarTokenizer, GrammarViolation, grammar_status
from dendrite.grammar.matcher import is_limit_error

# One byte repeated 99999 times: compiles, and its first mask is fine, but
# consuming the byte runs llguidance's lexer out of expressions.
EXHAUSTING = ".\\u0000{99999}"


def test_limit_hit_on_an_allowed_token_ends_the_generation(hf_tokenizer, eos_id):
    tok = GrammarTokenizer(hf_tokenizer, eos_id)  # own cache
    c = Constraint(regex=EXHAUSTING)
    m = c.matcher(tok)
    m.consume(tok.ll.tokenize_str("a")[0])
    nul = tok.ll.tokenize_str("\x00")
    assert m.allowed_tokens() == nul
    assert c.key in tok._cache
    m.consume(nul[0])  # allowed, so not a GrammarViolation
    assert m.is_error() and is_limit_error(m.error)
    assert m.allowed_tokens() == [eos_id]  # the generation can only end
    assert grammar_status(m, "eos") == "incomplete"
    assert c.key not in tok._cache  # exhausted prototype dropped
    fresh = c.matcher(tok)
    assert not fresh.is_error() and fresh.allowed_tokens() != [eos_id]


def test_forbidden_tokens_still_raise(gtok):
    m = Constraint(regex="ab").matcher(gtok)
    with pytest.raises(GrammarViolation, match="doesn't satisfy"):
        m.consume(gtok.ll.tokenize_str("x")[0])
    m = Constraint(regex="ab").matcher(gtok)
    with pytest.raises(GrammarViolation):
        m.consume_many(gtok.ll.tokenize_str("ax"))


@pytest.mark.parametrize(
    "message,limit",
    [
        ("lexer error: too many expressions constructed", True),
        ("Parser Error: Current row has 2001 items; max is 2000; consider ...", True),
        ("fuel exhausted when checking relevance of lexemes (1000)", True),
        ("parser error: Too many items (limit 50000; ff_tokens); try avoiding ...", True),
        ("Parser Error: token \"x\" doesn't satisfy the grammar; byte 'x' fails parse", False),
        # A token's text cannot pass for a limit message.
        ('Parser Error: token "lexer error:" doesn\'t satisfy the grammar', False),
        ("", False),
    ],
)
def test_limit_messages(message, limit):
    assert is_limit_error(message) is limit
