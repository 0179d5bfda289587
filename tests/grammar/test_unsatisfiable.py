"""Grammars that match no string are rejected before generation, with a reason and a place.

llguidance accepts many of them and only fails at the first mask (or never
finishes). Building a Constraint checks, without a tokenizer, the first mask
on a byte tokenizer and, for lark grammars, that the start rule and every
rule it reaches can derive a finite string; compiling checks the first mask
with the model's tokenizer.
"""

from __future__ import annotations

import pytest
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

from dendrite.grammar import Constraint, GrammarError, GrammarTokenizer


def _rejected(**spec) -> GrammarError:
    """The GrammarError from building `spec`: these checks need no tokenizer."""
    with pytest.raises(GrammarError) as ei:
        Constraint(**spec)
    return ei.value


@pytest.mark.parametrize(
    "pattern", [r"[^\s\S]", r"a[^\s\S]b", r"(a|[^\s\S])[^\s\S]", r"x{2}[^\s\S]{1}", r"[^\s\S]+"]
)
def test_empty_regexes(pattern):
    e = _rejected(regex=pattern)
    assert e.kind == "regex"
    assert "grammar matches no string" in e.message
    assert "NoExtension" in e.message  # llguidance's own word for it
    assert "\n" not in str(e)


@pytest.mark.parametrize(
    "pattern,accepts",
    [("a{2}b{0}", "aa"), ("a{0}", ""), ("(|x)", ""), (r"[^\s\S]|ok", "ok"), ("[a-c]{0,0}z?", "")],
)
def test_satisfiable_regexes_are_not_flagged(gtok, pattern, accepts):
    """Near misses: each matches something (maybe only the empty string)."""
    m = Constraint(regex=pattern).matcher(gtok)
    ids = gtok.ll.tokenize_str(accepts) if accepts else []
    assert m.validate_tokens([*ids, gtok.eos_token_ids[0]]) == len(ids) + 1


@pytest.mark.parametrize(
    "schema,path,fragment",
    [
        (False, "", "schema is false"),
        ({"not": {}}, "/not", "not"),  # llguidance does not implement `not` at all
        ({"type": "integer", "minimum": 5, "maximum": 1}, "/minimum", "Unsatisfiable"),
        ({"enum": []}, "/enum", "Unsatisfiable"),
        ({"type": "string", "minLength": 5, "maxLength": 2}, "/minLength", "Unsatisfiable"),
        ({"allOf": [{"type": "string"}, {"type": "integer"}]}, "/allOf/0/type", "incompatible"),
        (
            {"type": "object", "properties": {"a": {"enum": []}}, "required": ["a"]},
            "/properties/a/enum",
            "Unsatisfiable",
        ),
        # Found only at the first mask: a $ref that resolves to itself.
        ({"$defs": {"a": {"$ref": "#/$defs/a"}}, "$ref": "#/$defs/a"}, "/$defs/a/$ref", "matches"),
    ],
)
def test_unsatisfiable_schemas(schema, path, fragment):
    e = _rejected(json_schema=schema)
    assert e.kind == "json_schema" and fragment in e.message
    assert e.json_path == path and e.location == "#" + path


def test_first_mask_schema_error_says_matches_no_string():
    e = _rejected(json_schema={"$defs": {"a": {"$ref": "#/$defs/a"}}, "$ref": "#/$defs/a"})
    assert e.message.startswith("grammar matches no string")
    assert str(e).startswith("invalid json_schema at #/$defs/a/$ref: grammar matches no string")


@pytest.mark.parametrize(
    "grammar,line,fragment",
    [
        ('start: a\na: "x" a\n', 2, "rule 'a' cannot derive a finite string"),
        ('start: a\na: a "x"\n', 2, "rule 'a' cannot derive a finite string"),  # left-recursive
        ('start: a b\na: "x"\nb: b\n', 3, "rule 'b'"),
        ('start: x\nx: "(" y ")"\ny: x | "[" x "]"\n', 2, "start -> x -> y -> x"),
        ('start: item+\nitem: "a" item\n', 2, "rule 'item'"),
        ('start: ("x" start)+\n', 1, "rule 'start'"),
        ('start: "a" B\nB: /[^\\s\\S]/\n', 2, "terminal B matches no string"),
        ('start: "a" B\nB: "x" /[^\\s\\S]/\n', 2, "terminal B"),
        ('start: "a" /[^\\s\\S]/\n', None, r"terminal /[^\s\S]/"),
        ("start: /[^\\s\\S]/\n", None, "matches no string"),
        # Special tokens are llguidance's syntax; the check still reads the rules.
        ('start: <|user|> a\na: "b" a\n', 2, "rule 'a'"),
    ],
)
def test_lark_grammars_without_a_finite_string(grammar, line, fragment):
    e = _rejected(grammar=grammar)
    assert e.kind == "grammar"
    assert e.message.startswith("grammar matches no string"), e.message
    assert fragment in e.message
    assert e.line == line
    if line is not None:
        assert e.location == f"line {line}, col 1"


@pytest.mark.parametrize(
    "grammar",
    [
        'start: a\na: "x" a | "y"\n',
        'start: a*\na: "x" a | "y"\n',
        'start: <|user|> "a"\n',
        'start: %json {"type": "integer"}\n',  # lark cannot read it: no verdict, compiles
        "start: NUMBER\n%import common.NUMBER\n",
    ],
)
def test_satisfiable_lark_grammars_compile(gtok, grammar):
    Constraint(grammar=grammar).compile(gtok)


@pytest.mark.parametrize(
    "grammar,line,fragment",
    [
        ('start: "a" | b\nb: b "c"\n', 2, "rule 'b' cannot derive a finite string"),
        ('start: a*\na: "x" a\n', 2, "rule 'a'"),  # only zero repetitions finish
        ('start: "a" | c\nc: d\nd: d\n', 3, "start -> c -> d -> d"),
        ('start: "a" | B\nB: /[^\\s\\S]/\n', 2, "terminal B matches no string"),
        ('start: (a a b | ) a A\na: B\nb: b\nA: "p" B?\nB: "t"\n', 3, "rule 'b'"),
    ],
)
def test_lark_grammars_with_a_dead_end(grammar, line, fragment):
    """Start can finish, but a reachable rule cannot: llguidance's masks would lead into it."""
    e = _rejected(grammar=grammar)
    assert e.message.startswith("grammar has a dead end: "), e.message
    assert fragment in e.message and e.line == line


def test_dead_end_is_real(gtok):
    """Why dead ends are errors: the mask allows a prefix that can never complete."""
    import llguidance

    text = 'start: (a a b | ) a A\na: B\nb: b\nA: "p" B?\nB: "t"\n'
    m = llguidance.LLMatcher(gtok.ll, llguidance.LLMatcher.grammar_from_lark(text), log_level=0)
    t = gtok.ll.tokenize_str("t")
    assert m.consume_tokens(t + t)  # "tt" is allowed ...
    assert not m.is_accepting()
    # ... and then nothing but the dead rule b is left.
    assert m.validate_tokens(gtok.ll.tokenize_str("p")) == 0


def _bytes_missing_c() -> Tokenizer:
    """A byte-level BPE whose vocabulary lacks the byte 'c' (no byte fallback)."""
    tok = Tokenizer(models.BPE(vocab={"a": 0, "b": 1, "ab": 2}, merges=[("a", "b")]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken("<eos>", special=True)])
    return tok


def test_grammar_the_tokenizer_cannot_produce():
    """Found at compile, with the tokenizer; the rejected grammar is not cached."""
    hf = _bytes_missing_c()
    tok = GrammarTokenizer(hf, hf.token_to_id("<eos>"))
    c = Constraint(regex="c+")  # fine without a tokenizer
    with pytest.raises(GrammarError, match="matches no string this tokenizer can produce") as ei:
        c.compile(tok)
    assert ei.value.kind == "regex" and "\n" not in str(ei.value)
    assert len(tok._cache) == 0
    Constraint(regex="a|c").compile(tok)  # "a" can be produced
    assert len(tok._cache) == 1
