"""Fuzzing the engine's boundary: random sampling parameters, random token
lists and random sequences of operations either work or fail with a clear
ValueError/TypeError, and never leave the engine inconsistent or leak a page."""

import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dendrite.engine import LeafTooLarge
from dendrite.kv import check_invariants
from dendrite.sampling import SamplingParams

FUZZ = settings(max_examples=25, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])

_numbers = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-5, 5),
                     st.just("1"), st.none(), st.booleans())
_ints = st.one_of(st.integers(-3, 12), st.integers(2 ** 63, 2 ** 65), st.floats(-2, 20),
                  st.just("4"), st.booleans())


@st.composite
def sampling_kwargs(draw):
    kw = {}
    for name, strat in [("temperature", _numbers), ("top_p", _numbers), ("min_p", _numbers),
                        ("repetition_penalty", _numbers), ("top_k", _ints),
                        ("max_tokens", _ints), ("seed", _ints), ("logprobs", st.integers(-1, 3)),
                        ("stop", st.one_of(st.none(), st.text(max_size=3),
                                           st.lists(st.text(max_size=3), max_size=2))),
                        ("stop_token_ids", st.lists(st.integers(-2, 600), max_size=2)),
                        ("ignore_eos", st.booleans())]:
        if draw(st.booleans()):
            kw[name] = draw(strat)
    return kw


def _check_engine(e):
    check_invariants(e.pool, [e.tree], [e.cache] if e.cache else [])


@FUZZ
@given(kw=sampling_kwargs())
def test_random_sampling_params_work_or_are_rejected_cleanly(make_engine, kw):
    # A small pool: a huge max_tokens that never meets EOS fills it in a few
    # hundred steps and fails that request cleanly (LeafTooLarge).
    e = make_engine(num_pages=8)
    try:
        params = SamplingParams(**kw)
    except (ValueError, TypeError) as exc:
        assert str(exc)
        return
    s = e.new_sequence("The fox")
    try:
        r = e.generate(s, params)[0]
    except ValueError as exc:  # a stop token id past this model's vocabulary
        assert "stop_token_ids" in str(exc) and s.handle is None
    except LeafTooLarge:
        assert params.max_tokens > 8 * 16 and s.handle.result.finish_reason == "error"
    else:
        assert len(r.token_ids) <= params.max_tokens
        assert all(0 <= t < e.runner.vocab_size for t in r.token_ids)
        assert all(math.isfinite(lp) and lp <= 1e-4 for lp in r.logprobs)
        assert r.finish_reason in ("stop", "eos", "length")
    s.release()
    _check_engine(e)


@FUZZ
@given(ids=st.lists(st.one_of(st.integers(-2, 520), st.integers(2 ** 31, 2 ** 64),
                              st.floats(0, 10), st.booleans()), max_size=40))
def test_random_token_lists_work_or_are_rejected_cleanly(make_engine, ids):
    e = make_engine()
    before = e.tree.num_live_nodes
    try:
        s = e.new_sequence(ids)
    except (ValueError, TypeError) as exc:
        assert "prompt" in str(exc)
        assert e.tree.num_live_nodes == before
        return
    try:
        r = e.generate(s, SamplingParams(temperature=0, max_tokens=2, ignore_eos=True))[0]
        assert len(r.token_ids) == 2
    except ValueError as exc:  # an empty prompt cannot generate
        assert not ids and "empty" in str(exc)
    s.release()
    _check_engine(e)


_op = st.one_of(
    st.tuples(st.just("new"), st.integers(0, 120), st.floats(allow_nan=True)),
    st.tuples(st.just("fork"), st.integers(0, 9), st.integers(-1, 4)),
    st.tuples(st.just("submit"), st.integers(0, 9), st.integers(-1, 20)),
    st.tuples(st.just("append"), st.integers(0, 9), st.integers(-2, 600)),
    st.tuples(st.just("release"), st.integers(0, 9), st.integers(0, 0)),
    st.tuples(st.just("step"), st.integers(1, 4), st.integers(0, 0)),
)


@settings(max_examples=20, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(ops=st.lists(_op, min_size=1, max_size=25), pages=st.integers(8, 40))
def test_random_operations_keep_the_engine_consistent(make_engine, ops, pages):
    """Any interleaving of valid and invalid calls in a small pool: each call
    either works or raises a clear error; the tree, pool and cache stay
    consistent and every request eventually finishes or fails on its handle."""
    e = make_engine(num_pages=pages)
    seqs, handles = [], []
    for op, a, b in ops:
        live = [s for s in seqs if not s.released]
        try:
            if op == "new":
                seqs.append(e.new_sequence([1 + i % 200 for i in range(a)],
                                           priority=b if b == b else float("nan")))
            elif op == "fork" and live:
                seqs.extend(live[a % len(live)].fork(b))
            elif op == "submit" and live:
                handles.append(e.submit(live[a % len(live)],
                                        SamplingParams(temperature=0.5, seed=a, max_tokens=b,
                                                       ignore_eos=True)))
            elif op == "append" and live:
                live[a % len(live)].append_tokens([b])
        except (ValueError, TypeError, RuntimeError) as exc:
            assert str(exc)
        except LeafTooLarge as exc:
            # fork flushes its parent first: with the pool held by leaves of
            # higher priority that prefill cannot fit, and the fork says so.
            assert op == "fork" and "raise num_pages" in str(exc), (op, exc)
        # Neither releasing nor stepping may fail, whatever was rejected before.
        if op == "release" and live:
            live[a % len(live)].release()
        elif op == "step":
            for _ in range(a):
                e.step()
        _check_engine(e)
    for _ in range(500):
        if all(h.done for h in handles):
            break
        e.step()
    assert all(h.done for h in handles)
    for h in handles:
        if h.result.finish_reason == "error":
            assert isinstance(h.error, LeafTooLarge)
        elif h.result.finish_reason != "abort":
            assert len(h.result.token_ids) == h.params.max_tokens
    for s in seqs:
        s.release()
    _check_engine(e)


@pytest.mark.parametrize("n", [1, 3])
def test_released_sequences_reject_every_operation(make_engine, n):
    e = make_engine()
    s = e.new_sequence("The fox")
    kids = s.fork(n)
    kids[0].release()
    for call in (lambda: kids[0].fork(1), lambda: kids[0].append_tokens([1]),
                 lambda: e.submit(kids[0], SamplingParams())):
        with pytest.raises(RuntimeError, match="released"):
            call()
    for k in kids[1:]:
        k.release()
    s.release()
    _check_engine(e)
