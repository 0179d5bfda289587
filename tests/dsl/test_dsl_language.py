"""The .dendrite front end: grammar coverage, strings, expressions, compiled programs.

Programs here never touch the model (no prompt text, no gen), so they run
with ``engine=None``; scripts that generate are run in tests/program/.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from lark import Tree

import dendrite.dsl as dsl
from dendrite.program import Program

ScriptRuntimeError = dsl.ScriptRuntimeError
split_string = dsl.split_string


def run(src: str, **args):
    """Compile and run an engine-free program; returns its value."""
    return dsl.loads(src, "t.dendrite").run(None, **args).value


def test_grammar_is_a_lark_file_used_by_the_parser():
    assert dsl.GRAMMAR.name == "dendrite.lark"
    text = dsl.GRAMMAR.read_text()
    assert "fork_stmt" in text and "%declare _INDENT _DEDENT" in text
    tree = dsl.parse("program t(q):\n    pass\n")
    assert isinstance(tree, Tree) and tree.data == "start"


def test_every_statement_parses():
    src = '''
# a comment
program everything(question, width=2, k=1, depth=2, names=["a", "b"]):
    """long
prompt {question}"""
    "Q: {question}\\n"   # trailing comment
    let n = 0
    n = n + 1
    repeat depth:
        fork width as step:
            gen thought(max_tokens=8, stop=["\\n", "."], temperature=0.7, top_p=0.9,
                        top_k=20, min_p=0.0, repetition_penalty=1.1)
        prune step keep k by logprob
    for name in names:
        "{name} "
    while len(text) < 10 max 3:
        gen more(max_tokens=2, ignore_eos=true)
    if n > 0 and not false:
        gen yes(choices=["yes", "no"])
    elif n == 0:
        gen num(regex=r"[0-9]{1,3}")
    else:
        gen obj(json_schema={"type": "object"})
    search bfs(width=2, keep=1, depth=1) as t by sum_logprob:
        gen s(max_tokens=4)
    select t by sum_logprob / tokens
    return [thought, vote(thought), n]
'''
    prog = dsl.loads(src, "all.dendrite")
    assert isinstance(prog, Program)
    assert [p.name for p in prog.params] == ["question", "width", "k", "depth", "names"]
    assert prog.params[4].default == ["a", "b"]
    assert prog.params[0].required


def test_several_programs_per_file():
    src = "program a():\n    return 1\n\nprogram b(x=2):\n    return x * 3\n"
    progs = dsl.loads_all(src)
    assert list(progs) == ["a", "b"]
    assert dsl.loads(src).name == "a"
    assert dsl.loads(src, name="b").run(None).value == 6
    with pytest.raises(KeyError):
        dsl.loads(src, name="c")


@pytest.mark.parametrize(
    "expr, value",
    [
        ("1 + 2 * 3", 7),
        ("(1 + 2) * 3", 9),
        ("2 ** 3 ** 2", 512),
        ("-2 ** 2", -4),
        ("7 // 2 + 7 % 2", 4),
        ("7 / 2", 3.5),
        ("1 < 2 < 3", True),
        ("1 < 3 < 2", False),
        ("'a' in 'abc' and 'z' not in 'abc'", True),
        ("not 0 or 5", True),
        ("0 or 5", 5),
        ("[1, 2, 3][1]", 2),
        ("{'a': 1}['a']", 1),
        ("len('abc') + int('4') + float('0.5')", 7.5),
        ("number('so 3 + 4 = 7 apples')", 7),
        ("number('total: 1,234.5')", 1234.5),
        ("number('none')", None),
        ("match('answer: 42', r'answer: (\\d+)')", "42"),
        ("lower(strip('  Hi '))", "hi"),
        ("join('-', split('a b c'))", "a-b-c"),
        ("max(3, 9, 4)", 9),
        ("range(3)", [0, 1, 2]),
        ("contains('haystack', 'st')", True),
        ("json('[1, 2]')", [1, 2]),
        ("true and True and not none", True),
    ],
)
def test_expressions(expr, value):
    assert run(f"program t():\n    return {expr}\n") == value


def test_params_defaults_and_lets():
    src = "program t(a, b=10):\n    let c = a * b\n    c = c + 1\n    return [a, b, c]\n"
    assert run(src, a=2) == [2, 10, 21]
    assert run(src, a=1, b=1) == [1, 1, 2]
    with pytest.raises(TypeError, match="missing required argument 'a'"):
        run(src)
    with pytest.raises(TypeError, match="unexpected argument"):
        run(src, a=1, zz=2)


def test_loops_are_bounded_and_run():
    src = """program t(n=3):
    let total = 0
    repeat n:
        total = total + 1
    for x in [10, 20]:
        total = total + x
    let i = 0
    while i < 100 max 5:
        i = i + 1
    return [total, i]
"""
    assert run(src) == [33, 5]


def test_if_elif_else():
    src = """program t(x):
    let r = "none"
    if x > 5:
        r = "big"
    elif x > 2:
        r = "mid"
    else:
        r = "small"
    return r
"""
    assert [run(src, x=v) for v in (9, 3, 0)] == ["big", "mid", "small"]


def test_runtime_error_is_located():
    src = "program t(x):\n    let y = int(x) + 1\n    return y\n"
    with pytest.raises(ScriptRuntimeError) as ei:
        run(src, x="abc")
    e = ei.value
    assert (e.line, e.column) == (2, 13)
    assert "ValueError" in e.message and str(e).startswith("t.dendrite:2:13: ValueError")


def test_loop_bound_is_checked_at_run_time():
    with pytest.raises(ScriptRuntimeError, match="repeat count must be a non-negative int"):
        run("program t(n):\n    repeat n:\n        pass\n", n="x")
    with pytest.raises(ScriptRuntimeError, match="exceeds the limit"):
        run("program t(n):\n    repeat n:\n        pass\n", n=10**9)


# ---------------------------------------------------------------- strings


def texts(raw: str):
    return [(p.text, p.expr) for p in split_string(raw, 1, 1)]


def test_string_pieces_and_escapes():
    assert texts('"Q: {question}\\n"') == [("Q: ", None), ("", "question"), ("\n", None)]
    assert texts('"{{literal}} \\t\\"x\\""') == [("{literal} \t\"x\"", None)]
    assert texts('"\\{not\\}"') == [("{not}", None)]
    assert texts('r"[0-9]{1,3}\\n"') == [("[0-9]{1,3}\\n", None)]
    assert texts('"{ a + 1 }!"') == [("", "a + 1"), ("!", None)]
    assert texts("'{d[\"k\"]}'") == [("", 'd["k"]')]
    assert texts('"\\x41\\u00e9"') == [("Aé", None)]


def test_interpolation_positions_in_long_strings():
    pieces = split_string('"""line one\n  {name} here"""', 5, 9)
    expr = [p for p in pieces if p.expr][0]
    assert (expr.line, expr.column) == (6, 4)


def test_interpolation_formats_values():
    assert run('program t(x=3.0):\n    let s = "v={x} {[1, 2]}"\n    return s\n') == "v=3 [1, 2]"


# ---------------------------------------------------------------- shipped scripts


@pytest.mark.parametrize("name", ["tot", "mcts", "beam", "self_consistency"])
def test_standard_scripts_compile(name):
    path = dsl.standard_script(name)
    assert path.suffix == ".dendrite" and path.parent == dsl.PROGRAMS_DIR
    prog = dsl.load(path)
    assert prog.name == name
    assert prog.params[0].required  # the question / prompt


def test_standard_script_lookup_errors():
    with pytest.raises(FileNotFoundError, match="have: beam, mcts, self_consistency, tot"):
        dsl.standard_script("nope")


def test_programs_dir_ships_only_scripts():
    names = sorted(p.name for p in Path(dsl.PROGRAMS_DIR).iterdir())
    assert names == ["beam.dendrite", "mcts.dendrite", "self_consistency.dendrite", "tot.dendrite"]


def test_bad_per_state_gen_option_is_located_at_run_time():
    prog = dsl.loads("program t(n):\n    gen x(max_tokens=n)\n", "g.dendrite")
    with pytest.raises(ScriptRuntimeError) as ei:
        prog.run(None, n="many")
    assert (ei.value.line, ei.value.column) == (2, 11)
    assert "max_tokens must be a positive int" in ei.value.message
