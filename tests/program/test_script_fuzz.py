"""Fuzz: mutated shipped scripts either run or fail with a located ScriptError.

Each example takes a script of dendrite/dsl/programs, applies one to three random
mutations (delete / duplicate / swap tokens or lines; replace a number with
0, -1, 10**20, NaN or a string), compiles it and runs it on the tiny model
with a small step budget and branch limit. Whatever happens must be a clean
run or a `ScriptError` whose file:line:col lies inside the mutated script;
any other exception, a hang (a watchdog alarm), or a sequence left in the
engine fails the test.
"""

from __future__ import annotations

import re
import signal
from contextlib import contextmanager

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import dendrite.dsl as dsl

SCRIPTS = {p.stem: p.read_text() for p in sorted(dsl.PROGRAMS_DIR.glob("*.dendrite"))}

#: Tokens for mutation: strings, numbers, names, two-char operators, line breaks
#: with their indentation, runs of spaces, any other single character.
_TOKEN = re.compile(r'[rR]?"(?:[^"\\\n]|\\.)*"|\d+(?:\.\d+)?|\w+|\*\*|//|[=!<>]=|\n[ \t]*|[ \t]+|.')
_NUMBER = re.compile(r"\d+(?:\.\d+)?")
REPLACEMENTS = ["0", "-1", "10**20", 'float("nan")', '"x"', '""', "1e308"]

#: Small values for some parameters, each passed or not (then the script's
#: own, maybe mutated, default holds), so that many mutants run to the end.
SMALL_ARGS = {"step_tokens": 3, "max_tokens": 3, "chunk": 2, "iterations": 2, "n": 2, "depth": 1}

MAX_STEPS = 16
MAX_BRANCHES = 24
WATCHDOG_S = 30  # far above any example's time; only a hang reaches it


def _mutate_tokens(src: str, data: st.DataObject) -> str:
    toks = _TOKEN.findall(src)
    assert "".join(toks) == src
    kind = data.draw(st.sampled_from(["delete", "duplicate", "swap", "number"]))
    if kind == "number":
        idx = [i for i, t in enumerate(toks) if _NUMBER.fullmatch(t)]
        i = data.draw(st.sampled_from(idx))
        toks[i] = data.draw(st.sampled_from(REPLACEMENTS))
    else:
        # mutate meaningful tokens, not the spaces between them
        idx = [i for i, t in enumerate(toks) if not t.isspace() or "\n" in t]
        i = data.draw(st.sampled_from(idx))
        if kind == "delete":
            del toks[i]
        elif kind == "duplicate":
            toks.insert(i, toks[i])
        else:
            j = data.draw(st.sampled_from(idx))
            toks[i], toks[j] = toks[j], toks[i]
    return "".join(toks)


def _mutate_lines(src: str, data: st.DataObject) -> str:
    lines = src.split("\n")
    i = data.draw(st.integers(0, len(lines) - 1))
    kind = data.draw(st.sampled_from(["delete", "duplicate", "swap"]))
    if kind == "delete":
        del lines[i]
    elif kind == "duplicate":
        lines.insert(i, lines[i])
    else:
        j = data.draw(st.integers(0, len(lines) - 1))
        lines[i], lines[j] = lines[j], lines[i]
    return "\n".join(lines)


@contextmanager
def watchdog(seconds: int, what: str):
    def hang(signum, frame):
        raise TimeoutError(f"no result after {seconds} s: {what}")

    old = signal.signal(signal.SIGALRM, hang)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


@pytest.fixture(scope="module")
def fuzz_engine(make_engine):
    return make_engine(num_pages=512)


def assert_located(e: Exception, src: str) -> None:
    assert isinstance(e, dsl.ScriptError), f"{type(e).__name__}: {e}"
    lines = src.splitlines()
    assert e.filename == "mutant.dendrite"
    # a position inside the text, or just past its last line (end of file)
    assert 1 <= e.line <= max(len(lines), 1) + 1, (e.line, str(e))
    if e.line <= len(lines):
        assert 1 <= e.column <= len(lines[e.line - 1]) + 1, (e.column, str(e))
        assert e.source_line == lines[e.line - 1]
    text = str(e)
    assert text.startswith(f"mutant.dendrite:{e.line}:{e.column}: ")
    assert "Traceback" not in text


@settings(max_examples=150, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                 HealthCheck.data_too_large])
@given(name=st.sampled_from(sorted(SCRIPTS)), data=st.data())
def test_mutated_scripts_run_or_fail_located(fuzz_engine, name, data):
    src = SCRIPTS[name]
    for _ in range(data.draw(st.integers(1, 3))):
        mutate = data.draw(st.sampled_from([_mutate_tokens, _mutate_lines]))
        src = mutate(src, data)
    engine = fuzz_engine
    with watchdog(WATCHDOG_S, f"{name} mutant:\n{src}"):
        try:
            prog = dsl.loads(src, "mutant.dendrite")
            args = {p.name: "What is 2+3?" for p in prog.params if p.required}
            for p in prog.params:
                if p.name in SMALL_ARGS and data.draw(st.booleans(), label=f"small {p.name}"):
                    args[p.name] = SMALL_ARGS[p.name]
            prog.run(engine, seed=0, max_steps=MAX_STEPS, max_branches=MAX_BRANCHES, **args)
        except dsl.ScriptError as e:
            assert_located(e, src)
        except TimeoutError:
            raise
        except Exception as e:  # noqa: BLE001 - the property under test
            raise AssertionError(f"{type(e).__name__} escaped for mutant of {name}:\n{src}") from e
    assert engine.tree.num_live_nodes == 0
