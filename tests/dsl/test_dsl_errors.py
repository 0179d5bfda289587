"""Script errors carry file:line:col, the source line and a caret under the spot."""

from __future__ import annotations

import pytest

import dendrite.dsl as dsl

ScriptError, ScriptNameError, ScriptSyntaxError = dsl.ScriptError, dsl.ScriptNameError, dsl.ScriptSyntaxError


def err(src: str, filename: str = "t.dendrite") -> ScriptError:
    with pytest.raises(ScriptError) as ei:
        dsl.loads(src, filename)
    return ei.value


def caret_col(e: ScriptError) -> int:
    """1-based column of the caret in the formatted error."""
    lines = str(e).splitlines()
    assert len(lines) == 3, str(e)
    src_line, caret_line = lines[1], lines[2]
    assert src_line == "    " + e.source_line
    assert caret_line.strip() == "^"
    return caret_line.index("^") - 4 + 1


def test_unknown_gen_option_layout():
    src = "program t(q):\n    gen thought(max_tokens=8, temprature=0.8)\n"
    e = err(src, "tot.dendrite")
    assert isinstance(e, ScriptNameError)
    assert str(e).splitlines()[0].startswith("tot.dendrite:2:31: unknown gen option 'temprature'")
    assert "did you mean 'temperature'" in str(e)
    assert (e.line, e.column) == (2, 31)
    assert caret_col(e) == 31
    assert e.source_line == "    gen thought(max_tokens=8, temprature=0.8)"


@pytest.mark.parametrize(
    "src, line, col, message",
    [
        # undefined variable in an interpolation: the caret is on the name inside the string
        ('program t(q):\n    "Q: {qq}"\n', 2, 10, "undefined name 'qq' (did you mean 'q'?)"),
        # undefined capture in an expression
        ("program t(q):\n    gen a\n    let b = answer + a\n", 3, 13, "undefined name 'answer'"),
        # capture used before the gen that defines it
        ("program t(q):\n    let b = a\n    gen a\n", 2, 13, "undefined name 'a'"),
        # assignment to an undefined name
        ("program t(q):\n    x = 1\n", 2, 5, "undefined name 'x' (use 'let x = ...' to define it)"),
        ("program t(q):\n    let y = fooo(q)\n", 2, 13, "unknown function 'fooo'"),
        ("program t(q):\n    let y = lenn(q)\n", 2, 13, "unknown function 'lenn' (did you mean 'len'?)"),
        ("program t(q):\n    prune foo keep 2\n", 2, 11, "undefined fork group 'foo'"),
        (
            "program t(q):\n    fork 2 as a:\n        gen x\n    fork 2 as b:\n        gen y\n    prune a keep 1\n",
            6, 11, "'a' is not the current fork group (the frontier is 'b')",
        ),
        ("program t(q):\n    search mcst(width=2) as n:\n        gen x\n", 2, 12, "unknown search 'mcst' (did you mean 'mcts'?)"),
        ("program t(q):\n    search mcts(widht=2) as n:\n        gen x\n", 2, 17, "unknown option of search mcts 'widht' (did you mean 'width'?)"),
        ("program t(q):\n    let y = len\n", 2, 13, "'len' is a function; call it as len(...)"),
        ("program t(q, q):\n    pass\n", 1, 14, "duplicate parameter 'q'"),
        (
            'program t(q):\n    gen x\n    prune keep 2 by judge("rate", temp=0)\n',
            3, 35, "unknown judge option 'temp'",
        ),
        # names inside a judge template are checked like any interpolation
        ('program t(q):\n    gen x\n    prune keep 2 by judge("rate {y}")\n', 3, 34, "undefined name 'y'"),
    ],
)
def test_name_errors(src, line, col, message):
    e = err(src)
    assert isinstance(e, ScriptNameError), e
    assert (e.line, e.column) == (line, col), str(e)
    assert e.message.startswith(message)
    assert caret_col(e) == col
    assert str(e).startswith(f"t.dendrite:{line}:{col}: {message}")


@pytest.mark.parametrize(
    "src, line, col, message",
    [
        ("program t(q)\n    pass\n", 1, 13, "unexpected end of line, expected ':'"),
        ("program t(q):\n    gen x\n        gen y\n", 3, 9, "unexpected indent"),
        ("program t(q):\n    gen x\n  gen y\n", 3, 3, "unindent does not match any outer indentation level"),
        ("program t(q):\n    gen x(max_tokens=3\n", 2, 10, "'(' was never closed"),
        ('program t(q):\n    "abc\n', 2, 5, "unterminated string"),
        ("program t(q):\n    gen x @\n", 2, 11, "unexpected character '@'"),
        ("program t(q):\n    return 1\n    gen y\n", 2, 5, "'return' must be the last statement of the program"),
        ('program t(q):\n    "a {q +} b"\n', 2, 12, "incomplete expression in {...}"),
        ('program t(q):\n    "a {q} }"\n', 2, 12, "single '}' in string (write '}}' for a brace)"),
        ('program t(q):\n    "a {q"\n', 2, 8, "'{' in string is never closed (write '{{' for a brace)"),
        ('program t(q):\n    gen x(max_tokens="8")\n', 2, 11, "max_tokens must be a positive int, got '8'"),
        ('program t(q):\n    gen x(regex="[0-9", choices=["a"])\n', 2, 25, "gen takes at most one constraint, got regex, choices"),
        ("program t(q):\n    gen x(max_tokens=1, max_tokens=2)\n", 2, 25, "gen option 'max_tokens' given twice"),
        ("program t(q):\n    gen x\n    repeat len(x):\n        pass\n", 3, 12, "repeat count must not depend on a branch's values"),
        ('program t(q):\n    let z = judge("x")\n', 2, 13, "judge() can only be used after 'by'"),
        ("program t(q):\n    search mcts as n:\n        fork 2 as k:\n            gen x\n", 3, 9, "'fork' is not allowed in a search step"),
        ("program t(q=1, r):\n    pass\n", 1, 16, "parameter 'r' without a default follows one with a default"),
        ("# nothing here\n", 1, 1, "no 'program name(...):' in script"),
    ],
)
def test_syntax_errors(src, line, col, message):
    e = err(src)
    assert isinstance(e, ScriptSyntaxError), e
    assert e.message == message, str(e)
    assert (e.line, e.column) == (line, col), str(e)
    if e.source_line:
        assert caret_col(e) == col


def test_invalid_regex_points_into_the_pattern():
    e = err('program t(q):\n    gen x(regex="ab[0-")\n')
    assert e.message.startswith("invalid regex:")
    assert e.line == 2
    # the caret is inside the string literal, at the offending character
    assert 17 <= e.column <= 22
    assert caret_col(e) == e.column


def test_syntax_error_is_lark_positioned_past_first_line():
    src = "# comment\n\nprogram t(q):\n    # c\n    gen x(max_tokens=4,\n          stop=)\n"
    e = err(src)
    assert (e.line, e.column) == (6, 16)
    assert e.message.startswith("unexpected ')'")


def test_error_attributes_and_location():
    e = err('program t(q):\n    "{nope}"\n', "dir/x.dendrite")
    assert e.filename == "dir/x.dendrite"
    assert e.location == "dir/x.dendrite:2:7"
    assert e.format() == str(e)


def test_load_reports_the_path(tmp_path):
    p = tmp_path / "bad.dendrite"
    p.write_text("program t(q):\n    gen x(temprature=1)\n")
    with pytest.raises(ScriptNameError) as ei:
        dsl.load(p)
    assert str(ei.value).startswith(f"{p}:2:11: unknown gen option 'temprature'")


def test_tabs_keep_the_caret_aligned():
    e = err("program t(q):\n\tgen x(bad=1)\n")
    lines = str(e).splitlines()
    assert lines[2] == "    \t      ^"
