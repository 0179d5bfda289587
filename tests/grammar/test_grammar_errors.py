"""Invalid specs are rejected before generation, with llguidance's message and a location."""

from __future__ import annotations

import pytest

from dendrite.grammar import Constraint, GrammarError, GrammarViolation


@pytest.mark.parametrize(
    "schema,path,fragment",
    [
        (
            {"type": "object", "properties": {"a": {"type": "integer", "minimum": "x"}}},
            "/properties/a/minimum",
            "minimum",
        ),
        ({"type": "strin"}, "/type", "Invalid type"),
        (
            {"properties": {"a": {"$ref": "#/$defs/missing"}}},
            "/properties/a/$ref",
            "does not exist",
        ),
        (
            {"properties": {"a": {"$ref": "#/$defs/x"}}, "$defs": {"x": {"type": "strin"}}},
            "/$defs/x/type",
            "Invalid type",
        ),
        (
            {"type": "array", "items": {"type": "string", "pattern": "a(b"}},
            "/items/pattern",
            "unclosed group",
        ),
        ({"type": "integer", "minimum": 5, "maximum": 2}, "/minimum", "Unsatisfiable"),
        (
            {"anyOf": [{"type": "null"}, {"properties": {"q/r": {"maximum": "z"}}}]},
            "/anyOf/1/properties/q~1r/maximum",
            "maximum",
        ),
        ({"type": "array", "uniqueItems": True}, "/uniqueItems", "uniqueItems"),
    ],
)
def test_schema_errors_carry_message_and_json_path(schema, path, fragment):
    with pytest.raises(GrammarError) as ei:
        Constraint(json_schema=schema)
    e = ei.value
    assert isinstance(e, ValueError)
    assert e.kind == "json_schema"
    assert fragment in e.message
    assert e.json_path == path and e.location == "#" + path
    assert e.location in str(e) and fragment in str(e)


def test_schema_text_that_is_not_json_has_line_col():
    with pytest.raises(GrammarError) as ei:
        Constraint(json_schema='{"type": "object",\n "x": }')
    assert (ei.value.line, ei.value.column) == (2, 7)


@pytest.mark.parametrize(
    "pattern,offset,fragment",
    [
        ("ab(c", 2, "unclosed group"),
        ("x[z-a]", 2, "invalid character class range"),
        ("a{3,1}", 1, "repetition"),
    ],
)
def test_regex_errors_carry_offset(pattern, offset, fragment):
    with pytest.raises(GrammarError) as ei:
        Constraint(regex=pattern)
    e = ei.value
    assert e.kind == "regex" and fragment in e.message
    assert e.offset == offset and e.location == f"offset {offset}"
    # The message is about the user's pattern, not llguidance's lark wrapper.
    assert "start:" not in e.message


@pytest.mark.parametrize(
    "grammar,line,col,fragment",
    [
        ('start: foo\nfoo: "a" bar\n', 2, 6, "unknown name"),
        ('start: "a"\n  x: ( \n', 2, 8, "Expected token"),
        # llguidance points at the start of the rule's body here.
        ('start: x\nx: "a" | /[/\n', 2, 4, "unclosed character class"),
    ],
)
def test_lark_errors_carry_line_col(grammar, line, col, fragment):
    with pytest.raises(GrammarError) as ei:
        Constraint(grammar=grammar)
    e = ei.value
    assert e.kind == "grammar" and fragment in e.message
    assert (e.line, e.column) == (line, col)
    assert e.location == f"line {line}, col {col}"


def test_tokenizer_dependent_errors_surface_at_compile(gtok):
    # Special tokens are only known with a tokenizer; still before any matcher exists.
    c = Constraint(grammar='start: <|nope|> "a"')
    with pytest.raises(GrammarError) as ei:
        c.compile(gtok)
    assert "unknown special token" in ei.value.message and ei.value.line == 1
    with pytest.raises(GrammarError):
        c.matcher(gtok)


def test_choices_and_arguments_are_checked():
    with pytest.raises(GrammarError):
        Constraint(choices=[])
    with pytest.raises(TypeError):
        Constraint(choices="abc")
    with pytest.raises(TypeError):
        Constraint()
    with pytest.raises(TypeError):
        Constraint(regex="a", choices=["a"])
    with pytest.raises(TypeError):
        Constraint(regex="a", json_options={"whitespace_flexible": False})


def test_invalid_spec_allocates_nothing(gtok):
    """Errors come before compilation: the tokenizer's cache stays untouched."""
    before = len(gtok._cache)
    with pytest.raises(GrammarError):
        Constraint(json_schema={"type": "strin"})
    assert len(gtok._cache) == before


def test_consuming_a_forbidden_token_raises(gtok):
    m = Constraint(choices=["yes", "no"]).matcher(gtok)
    bad = gtok.ll.tokenize_str("x")[0]
    with pytest.raises(GrammarViolation, match="rejected"):
        m.consume(bad)
    assert m.is_error()
