"""Limits of the Python program API: fork counts, live branches, depth, the step
budget, gen option values, and a progress callback's exception reaching the caller."""

from __future__ import annotations

import math

import pytest

import dendrite.program as dp
from dendrite.program.options import GenOptionError
from dendrite.program.runtime import DEFAULT_MAX_STEPS, MAX_BRANCHES, Runtime, StepBudgetExceeded
from dendrite.program.state import MAX_DEPTH, MAX_FORK


def held(engine) -> tuple[int, int, int]:
    engine.cache.clear()
    return engine.tree.num_live_nodes, engine.cache.num_pinned, engine.memory_stats()["pages_used"]


def test_limits_match_the_engine():
    from dendrite.engine import MAX_FORK as ENGINE_MAX_FORK

    assert MAX_FORK == ENGINE_MAX_FORK
    assert MAX_BRANCHES == MAX_FORK and DEFAULT_MAX_STEPS >= 100_000


@pytest.mark.parametrize("n, exc, message", [
    (10 ** 20, ValueError, "fork: n=100000000000000000000 exceeds the limit of 65536 children per fork"),
    (MAX_FORK + 1, ValueError, "fork: n=65537 exceeds the limit of 65536"),
    (-1, ValueError, "fork: n must be >= 0, got -1"),
    ("3", TypeError, "fork: n must be an int, got '3' of type str"),
    (2.5, TypeError, "fork: n must be an int, got 2.5"),
    (True, TypeError, "fork: n must be an int, got True"),
    (float("nan"), TypeError, "fork: n must be an int, got nan"),
])
def test_bad_fork_counts_name_n_and_queue_nothing(engine, n, exc, message):
    rt = Runtime(engine)
    s = rt.new_root(0)
    s += "Q"
    with pytest.raises(exc) as ei:
        s.fork(n)
    assert str(ei.value).startswith(message)
    assert len(rt.tree) == 1 and len(s._queue) == 1  # only the prompt
    assert len(s.fork(2.0)) == 2  # an integral float is a count
    rt.close()


def test_live_branch_limit(engine):
    before = held(engine)

    @dp.program
    def grow(s, levels: int):
        s += "Q"
        frontier = [s]
        for _ in range(levels):
            kids = []
            for st in frontier:
                kids += st.fork(3)
                st.release()
            frontier = kids
        return len(frontier)

    assert grow.run(engine, seed=0, levels=2, max_branches=9).value == 9
    with pytest.raises(ValueError) as ei:
        grow.run(engine, seed=0, levels=3, max_branches=20)
    # the third level: each fork of 3 replaces one leaf: 9, 11, ..., 19, then 21 > 20
    assert str(ei.value) == ("fork: n=3 would make 21 live branches, over this run's limit of "
                             "max_branches=20 (release or prune branches first)")
    assert held(engine) == before


def test_released_and_pruned_branches_free_the_limit(engine):
    @dp.program
    def churn(s):
        s += "Q"
        for _ in range(10):
            kids = s.fork(4)
            for k in kids:
                k.release()
        return "ok"

    # 40 children in all, never more than 4 + the root alive
    assert churn.run(engine, seed=0, max_branches=5).value == "ok"


def test_batch_roots_count_as_branches(engine):
    @dp.program
    def p(s):
        return 1

    with pytest.raises(ValueError, match="a new root would make 3 live branches.*max_branches=2"):
        p.run_batch(engine, [{}, {}, {}], max_branches=2)


def test_depth_limit(engine):
    rt = Runtime(engine)
    s = rt.new_root(0)
    s += "Q"
    for _ in range(MAX_DEPTH):
        (s,) = s.fork(1)
    assert s.depth == MAX_DEPTH
    with pytest.raises(ValueError, match=f"is already {MAX_DEPTH} forks deep"):
        s.fork(1)
    assert s.fork(0) == []  # no child, no new depth
    rt.release_all()


def test_step_budget_stops_a_runaway_program(engine):
    before = held(engine)

    @dp.program
    def forever(s):
        s += "Go"
        while True:
            s.gen("x", max_tokens=4, temperature=1.0, ignore_eos=True)
            s["x"]  # waits: the engine steps

    with pytest.raises(StepBudgetExceeded) as ei:
        forever.run(engine, seed=0, max_steps=10)
    assert "budget of 10 engine steps" in str(ei.value)
    assert "(in gen 'x' of state #0)" in ei.value.__notes__
    assert held(engine) == before


def test_step_budget_is_not_hit_by_a_run_within_it(engine):
    @dp.program
    def p(s):
        s += "Go"
        s.gen("x", max_tokens=5, ignore_eos=True)
        return s["x"]

    r = p.run(engine, seed=0, max_steps=5)
    assert r.steps == 5


@pytest.mark.parametrize("kw, exc", [
    ({"max_steps": 0}, ValueError), ({"max_steps": -5}, ValueError),
    ({"max_steps": 2.5}, TypeError), ({"max_steps": "10"}, TypeError),
    ({"max_branches": 0}, ValueError), ({"max_branches": True}, TypeError),
])
def test_bad_limits_are_refused_before_running(engine, kw, exc):
    @dp.program
    def p(s):
        raise AssertionError("must not run")

    with pytest.raises(exc, match=next(iter(kw)) + " must be a positive int"):
        p.run(engine, seed=0, **kw)


@pytest.mark.parametrize("options, option, message", [
    ({"temperature": float("nan")}, "temperature", "temperature must be a number, got NaN"),
    ({"temperature": -1}, "temperature", "temperature must be finite and >= 0"),
    ({"temperature": math.inf}, "temperature", "temperature must be finite"),
    ({"temperature": "hot"}, "temperature", "temperature must be a number"),
    ({"temperature": 10 ** 400}, "temperature", "int too large"),
    ({"top_p": 0}, "top_p", "top_p must be in (0, 1]"),
    ({"top_k": 10 ** 20}, "top_k", "top_k must fit in 32 bits"),
    ({"top_k": 1.5}, "top_k", "top_k must be an int"),
    ({"min_p": 2}, "min_p", "min_p must be in [0, 1]"),
    ({"repetition_penalty": 0}, "repetition_penalty", "repetition_penalty must be finite and > 0"),
    ({"stop": 5}, "stop", "stop must be a string or a list of strings, got 5"),
    ({"stop": ["a", 1]}, "stop", "stop must be a string or a list of strings"),
    ({"stop_token_ids": [-1]}, "stop_token_ids", "stop_token_ids must be token ids >= 0"),
    ({"stop_token_ids": "ab"}, "stop_token_ids", "stop_token_ids must be a list of token ids"),
    ({"ignore_eos": "yes"}, "ignore_eos", "ignore_eos must be true or false"),
    ({"max_tokens": 10 ** 20}, "max_tokens", "max_tokens=100000000000000000000 exceeds the limit"),
])
def test_bad_gen_values_fail_at_the_gen_call(engine, options, option, message):
    rt = Runtime(engine)
    s = rt.new_root(0)
    s += "Q"
    with pytest.raises(GenOptionError) as ei:
        s.gen("x", **options)
    assert ei.value.option == option
    assert message in str(ei.value)
    assert len(s._queue) == 1  # nothing queued but the prompt
    rt.close()


class Stop(Exception):
    """What a server's progress callback raises at its deadline."""


def test_progress_exception_reaches_the_caller_unchanged(engine):
    before = held(engine)

    @dp.program
    def p(s):
        s += "Go"
        s.gen("x", max_tokens=8, ignore_eos=True)
        try:
            return s["x"]
        except Exception:  # noqa: BLE001 - program code must not swallow the stop
            return "swallowed"

    def progress(rt):
        if rt.steps >= 2:
            raise Stop("deadline")

    with pytest.raises(Stop, match="deadline"):
        p.run(engine, seed=0, progress=progress)
    assert held(engine) == before


def test_progress_exception_is_not_turned_into_a_script_error(dsl, engine):
    prog = dsl.loads('program p():\n    "Go"\n    gen x(max_tokens=8, ignore_eos=true)\n'
                     '    return len(x)\n')

    def progress(rt):
        raise Stop("cancelled")

    with pytest.raises(Stop, match="cancelled"):
        prog.run(engine, seed=0, progress=progress)
