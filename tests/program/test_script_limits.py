"""Script limits that need no generation: reserved parameters, huge numbers and
values, constant folding that fails, nested loops. Each is a located ScriptError,
found at once instead of after minutes of work or a raw Python exception."""

from __future__ import annotations

import pytest


def load_or_run(dsl, engine, src: str):
    with pytest.raises(dsl.ScriptError) as ei:
        dsl.loads(src, "t.dendrite").run(engine, seed=0)
    return ei.value


@pytest.mark.parametrize("name", ["seed", "progress", "max_steps", "max_branches"])
def test_reserved_parameter_names(dsl, name):
    with pytest.raises(dsl.ScriptNameError) as ei:
        dsl.loads(f"program p(q, {name}=1):\n    return q\n", "t.dendrite")
    e = ei.value
    assert (e.line, e.column) == (1, 14)
    assert e.message.startswith(f"parameter name '{name}' is reserved (a keyword of Program.run")


def test_number_with_too_many_digits(dsl):
    with pytest.raises(dsl.ScriptSyntaxError) as ei:
        dsl.loads("program p():\n    return " + "9" * 5000 + "\n", "t.dendrite")
    assert (ei.value.line, ei.value.column, ei.value.message) == (2, 12, "number too long (5000 digits)")


@pytest.mark.parametrize("src, line, col, message", [
    # constant lists/dicts are folded when the script compiles; a failure there is
    # left to the run, where it is located like any other expression
    ("program p():\n    let y = [1, 1 / 0]\n    return y\n", 2, 13, "ZeroDivisionError: division by zero"),
    ("program p():\n    let y = {[1]: 2}\n    return y\n", 2, 13, "TypeError: unhashable type: 'list'"),
    # a constant gen option is evaluated when the script compiles
    ('program p():\n    "Q"\n    gen x(max_tokens=1 // 0)\n    return x\n', 3, 22,
     "ZeroDivisionError: integer division or modulo by zero"),
])
def test_failing_constants_are_located(dsl, engine, src, line, col, message):
    e = load_or_run(dsl, engine, src)
    assert isinstance(e, dsl.ScriptRuntimeError)
    assert (e.line, e.column, e.message) == (line, col, message)


@pytest.mark.parametrize("expr, message, small, value", [
    ("2 ** 10**20", "OverflowError: integer result too large (about 100000000000000000000 bits, limit 100000)",
     "2 ** 1000 % 7", 2 ** 1000 % 7),
    ("len(range(10**8))", "OverflowError: range() would have 100000000 items, over the limit of 10000000",
     "len(range(1000))", 1000),
    ('len("ab" * 10**8)', "OverflowError: the repetition would have 200000000 items, over the limit of 10000000",
     'len("ab" * 1000)', 2000),
    ('len(replace("aaaa", "a", "b" * 10**7))',
     "OverflowError: replace() would have 40000000 items, over the limit of 10000000",
     'replace("aaaa", "a", "bc")', "bcbcbcbc"),
])
def test_huge_values_fail_at_once(dsl, engine, expr, message, small, value):
    e = load_or_run(dsl, engine, f"program p():\n    return {expr}\n")
    assert isinstance(e, dsl.ScriptRuntimeError)
    assert (e.line, e.column, e.message) == (2, 12, message)
    # the same expression within the limits still works
    assert dsl.loads(f"program p():\n    return {small}\n").run(engine, seed=0).value == value


def test_nested_loops_are_bounded_in_all(dsl, engine):
    e = load_or_run(dsl, engine, 'program p():\n    "Q"\n    repeat 100000:\n        repeat 100000:\n'
                                 '            pass\n    return 1\n')
    assert isinstance(e, dsl.ScriptRuntimeError)
    assert (e.line, e.column) == (4, 9)
    assert e.message == "the run's loops passed 1000000 iterations in all (the limit)"
