"""Branches advance together: engine steps grow with tree depth, not with branches."""

from __future__ import annotations

import dendrite.program as dp


@dp.program
def fan(s, n: int = 2, depth: int = 1, tokens: int = 4):
    s += "Let us think."
    frontier = [s]
    for _ in range(depth):
        kids = [k for st in frontier for k in st.fork(n)]
        for k in kids:
            k.gen("t", max_tokens=tokens, ignore_eos=True, temperature=1.0)
        frontier = dp.prune(kids, keep=2)
    return len(frontier)


def steps(make_engine, **args):
    e = make_engine()
    before = e.stats["steps"]
    r = fan.run(e, seed=0, **args)
    # every engine step was one of the runtime's batched rounds (no hidden flushes)
    assert e.stats["steps"] - before == r.steps
    return r.steps


def test_steps_do_not_grow_with_branches(make_engine):
    counts = {n: steps(make_engine, n=n, depth=1, tokens=4) for n in (2, 8, 32)}
    assert len(set(counts.values())) == 1, counts
    # one prefill step for the prompt, then one step per generated token
    assert counts[2] <= 4 + 2


def test_steps_grow_with_depth(make_engine):
    d1 = steps(make_engine, n=3, depth=1, tokens=4)
    d2 = steps(make_engine, n=3, depth=2, tokens=4)
    d3 = steps(make_engine, n=3, depth=3, tokens=4)
    assert d1 < d2 < d3
    assert d3 - d2 == d2 - d1 <= 4 + 2
    # and wider trees at the same depth take the same steps
    assert steps(make_engine, n=6, depth=3, tokens=4) == d3


def test_run_batch_shares_steps(make_engine):
    single = steps(make_engine, n=2, depth=2, tokens=3)
    e = make_engine()
    rs = fan.run_batch(e, [dict(n=2, depth=2, tokens=3)] * 3, seed=0)
    assert len(rs) == 3 and all(r.value == 2 for r in rs)
    assert rs[0].steps == single
    assert rs[0].tree is rs[1].tree and len(rs[0].tree.roots) == 3


def test_run_batch_propagates_errors(engine):
    @dp.program
    def maybe_fail(s, fail: bool):
        s += "x"
        s.gen("a", max_tokens=2, ignore_eos=True)
        if fail:
            raise ValueError("boom")
        return s["a"]

    import pytest

    with pytest.raises(ValueError, match="boom"):
        maybe_fail.run_batch(engine, [dict(fail=False), dict(fail=True), dict(fail=False)])
    # the engine is still usable afterwards
    assert isinstance(maybe_fail.run(engine, fail=False).value, str)
