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


@pytest.mark.parametrize(
    "text,path",
    [
        (
            '{"type":"object","properties":{"a":{"type":"integer","type":"strin"}}}',
            "/properties/a/type",
        ),
        # Valid either way, but the reader sees "strin" first: still ambiguous, still an error.
        (
            '{"type":"object","properties":{"a":{"type":"strin","type":"integer"}}}',
            "/properties/a/type",
        ),
        (
            '{"anyOf":[{"type":"null"},{"items":[{"minimum":1,"minimum":2}]}]}',
            "/anyOf/1/items/0/minimum",
        ),
        ('{"properties":{"a/b~c":{"enum":[1],"enum":[2]}}}', "/properties/a~1b~0c/enum"),
        # The inner object is dropped by the outer repeat; the outer one is reported.
        ('{"properties":{"a":{"x":1,"x":2},"a":{}}}', "/properties/a"),
    ],
)
def test_repeated_keys_in_schema_text_are_named(text, path):
    with pytest.raises(GrammarError) as ei:
        Constraint(json_schema=text)
    e = ei.value
    assert e.json_path == path and e.location == "#" + path
    assert "appears more than once" in e.message


def test_repeated_key_error_comes_before_llguidance():
    """Without the check, llguidance would see only the last "type" and report nothing here."""
    with pytest.raises(GrammarError, match="more than once"):
        Constraint(json_schema='{"type":"strin","type":"integer"}')
    Constraint(json_schema={"type": "integer"})  # a dict cannot repeat keys


_CHAIN = {"a": {"$ref": "#/definitions/b"}, "b": {"type": "integer", "minimum": "x"}}


@pytest.mark.parametrize(
    "schema,path,fragment",
    [
        (
            {
                "definitions": _CHAIN,
                "type": "object",
                "properties": {"p": {"$ref": "#/definitions/a"}},
            },
            "/definitions/b/minimum",
            "minimum",
        ),
        ({"definitions": _CHAIN, "$ref": "#/definitions/a"}, "/definitions/b/minimum", "minimum"),
        (
            {
                "$defs": {
                    "a": {"$ref": "#/$defs/b"},
                    "b": {"$ref": "#/$defs/c"},
                    "c": {"type": "strin"},
                },
                "properties": {"x": {"$ref": "#/$defs/a"}},
            },
            "/$defs/c/type",
            "Invalid type",
        ),
        (
            {
                "definitions": {
                    "a": {"$ref": "#/definitions/b"},
                    "b": {"type": "integer", "minimum": 5, "maximum": 1},
                },
                "properties": {"q": {"$ref": "#/definitions/a"}},
            },
            "/definitions/b/minimum",
            "Unsatisfiable",
        ),
        # Through nested arrays and anyOf, then two refs.
        (
            {
                "type": "array",
                "items": {
                    "type": "array",
                    "items": {"anyOf": [{"type": "null"}, {"$ref": "#/$defs/a"}]},
                },
                "$defs": {
                    "a": {"$ref": "#/$defs/b"},
                    "b": {"type": "array", "items": {"type": "number", "maximum": "z"}},
                },
            },
            "/$defs/b/items/maximum",
            "maximum",
        ),
        # A ref whose target is missing is the ref's fault.
        (
            {
                "properties": {"a": {"$ref": "#/definitions/b"}},
                "definitions": {"b": {"$ref": "#/definitions/c"}},
            },
            "/definitions/b/$ref",
            "does not exist",
        ),
        # Escaped pointer tokens (~0 ~1) in a chain are followed too.
        (
            {
                "$defs": {"a": {"$ref": "#/$defs/a~0b~1c"}, "a~b/c": {"type": "strin"}},
                "properties": {"x": {"$ref": "#/$defs/a"}},
            },
            "/$defs/a~0b~1c/type",
            "Invalid type",
        ),
        # The error is beside the ref, not behind it: not followed.
        (
            {
                "$defs": {"a": {"$ref": "#/$defs/b", "type": "strin"}, "b": {"type": "integer"}},
                "properties": {"x": {"$ref": "#/$defs/a"}},
            },
            "/$defs/a/type",
            "Invalid type",
        ),
    ],
)
def test_errors_behind_ref_chains_point_at_the_keyword(schema, path, fragment):
    with pytest.raises(GrammarError) as ei:
        Constraint(json_schema=schema)
    e = ei.value
    assert fragment in e.message
    assert e.json_path == path, (e.json_path, e.message)


@pytest.mark.parametrize(
    "spec,text",
    [
        ({"regex": "ab(c"}, "invalid regex at offset 2: unclosed group"),
        ({"grammar": 'start: foo\nfoo: "a" bar\n'}, 'invalid grammar at line 2, col 6: unknown name: "bar"'),
        (
            {"json_schema": {"$defs": {"b": {"type": "integer", "minimum": 5, "maximum": 1}},
                             "properties": {"q": {"$ref": "#/$defs/b"}}}},
            (
                "invalid json_schema at #/$defs/b/minimum: "
                "Unsatisfiable schema: minimum (5) is greater than maximum (1)"
            ),
        ),
    ],
)  # fmt: skip
def test_str_is_one_line_and_message_is_verbatim(spec, text):
    """str(e) drops llguidance's caret diagrams and snippets; e.message keeps them."""
    with pytest.raises(GrammarError) as ei:
        Constraint(**spec)
    assert str(ei.value) == text
    # llguidance's own text is kept: the Rust regex caret diagram always spans
    # lines (lark snippets only since llguidance 0.7.30).
    if "regex" in spec:
        assert "\n" in ei.value.message and "^" in ei.value.message


def test_llguidance_panic_is_a_located_grammar_error():
    """llguidance panics (a BaseException) formatting this wrong-typed value: its
    error message cuts the 4-byte character at byte 100. Found by test_fuzz."""
    bad = {"k": "a" * 93 + "\U000a7029" * 3}
    with pytest.raises(GrammarError) as ei:
        Constraint(json_schema={"type": "object", "properties": {"x": {"multipleOf": bad}}})
    e = ei.value
    assert "llguidance failed on it (internal error:" in e.message
    assert e.json_path == "/properties/x/multipleOf"
    assert "\n" not in str(e)


def test_deeply_nested_schemas_are_grammar_errors():
    """Past llguidance's nesting limit: a GrammarError, located without Python recursion."""
    inner: dict = {"type": "integer"}
    for _ in range(3000):
        inner = {"type": "array", "items": inner}
    with pytest.raises(GrammarError, match="recursion limit") as ei:
        Constraint(json_schema=inner)
    assert ei.value.json_path.startswith("/items/items/")
    text = '{"type":"array","items":' * 5000 + "{}" + "}" * 5000
    with pytest.raises(GrammarError, match="nested too deeply"):
        Constraint(json_schema=text)
