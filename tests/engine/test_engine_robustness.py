"""A rejected request leaves the engine intact: values are checked at the
boundary (a clear error naming the argument, before any state changes), a
failing leaf does not strand the others, and concurrent callers are safe."""

import math
import threading

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dendrite.engine import Engine, LeafTooLarge, ModelOutputError
from dendrite.kv import check_invariants
from dendrite.sampling import SamplingParams

PROMPT = "Question: Natalia sold clips to 48 of her friends in April, and then she sold"


def _live_nodes(e):
    return e.tree.num_live_nodes


# -- engine state survives a rejected request ------------------------------------------


@pytest.mark.parametrize("priority", [float("nan"), "high", None])
def test_bad_priority_is_rejected_before_any_state_changes(make_engine, priority):
    e = make_engine()
    nodes = _live_nodes(e)
    with pytest.raises((ValueError, TypeError), match="priority"):
        e.new_sequence(PROMPT, priority=priority)
    assert _live_nodes(e) == nodes  # no half-registered node
    s = e.new_sequence(PROMPT)
    with pytest.raises(ValueError, match="priority"):
        s.priority = float("nan")
    assert s.priority == 0.0
    r = e.generate(s, SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))[0]
    assert len(r.token_ids) == 3
    s.release()


def test_leaf_too_large_finishes_that_request_and_keeps_the_others_runnable(make_engine):
    e = make_engine(num_pages=6, prefix_cache=False)
    ok = [e.new_sequence("fox jumps") for _ in range(2)]
    big = e.new_sequence(" ".join(["fox"] * 200))
    params = SamplingParams(temperature=0.7, seed=1, max_tokens=4, ignore_eos=True)
    handles = [e.submit(s, params) for s in ok]
    hbig = e.submit(big, SamplingParams(max_tokens=4))
    with pytest.raises(LeafTooLarge, match="KV page") as info:
        e.run(handles + [hbig])
    assert info.value.sequence is big
    assert hbig.done and hbig.result.finish_reason == "error"
    # the other requests were not stranded: stepping on finishes them
    e.run(handles)
    assert all(len(h.result.token_ids) == 4 for h in handles)
    big.release()
    for s in ok:
        s.release()
    check_invariants(e.pool, [e.tree], [e.cache] if e.cache else [])


def test_too_large_request_is_not_retried_forever(make_engine):
    e = make_engine(num_pages=4, prefix_cache=False)
    big = e.new_sequence(" ".join(["fox"] * 200))
    h = e.submit(big, SamplingParams(max_tokens=2))
    with pytest.raises(LeafTooLarge):
        e.run([h])
    assert e.step() == []  # nothing left runnable: the failed leaf is parked
    big.release()


# -- values checked at the boundary ----------------------------------------------------


@pytest.mark.parametrize("kw, name", [
    (dict(temperature=float("nan")), "temperature"),
    (dict(temperature=float("inf")), "temperature"),
    (dict(temperature=-1), "temperature"),
    (dict(temperature="hot"), "temperature"),
    (dict(top_p=float("nan")), "top_p"),
    (dict(top_p=0.0), "top_p"),
    (dict(min_p=float("nan")), "min_p"),
    (dict(repetition_penalty=float("nan")), "repetition_penalty"),
    (dict(repetition_penalty=float("inf")), "repetition_penalty"),
    (dict(top_k=2.5), "top_k"),
    (dict(max_tokens=-1), "max_tokens"),
    (dict(max_tokens=1.5), "max_tokens"),
    (dict(max_tokens=True), "max_tokens"),
    (dict(seed=-1), "seed"),
    (dict(seed=2 ** 64), "seed"),
    (dict(seed=1.0), "seed"),
    (dict(logprobs=-1), "logprobs"),
    (dict(stop_token_ids=[-5]), "stop_token_ids"),
    (dict(stop=["ok", 3]), "stop"),
])
def test_bad_sampling_values_name_the_argument(kw, name):
    with pytest.raises((ValueError, TypeError), match=name):
        SamplingParams(**kw)


def test_seed_range_is_the_full_unsigned_64_bit_range():
    SamplingParams(seed=0)
    SamplingParams(seed=2 ** 64 - 1)


def test_max_tokens_zero_generates_nothing(make_engine):
    e = make_engine()
    s = e.new_sequence(PROMPT)
    r = e.generate(s, SamplingParams(max_tokens=0))[0]
    assert r.token_ids == [] and r.text == "" and r.finish_reason == "length"
    # and the sequence goes on normally afterwards
    r = e.generate(s, SamplingParams(temperature=0, max_tokens=2, ignore_eos=True))[0]
    assert len(r.token_ids) == 2
    s.release()


@pytest.mark.parametrize("bad", [-1, "vocab", 2 ** 40])
def test_token_ids_are_range_checked(make_engine, bad):
    e = make_engine()
    vocab = e.runner.vocab_size
    tok = vocab if bad == "vocab" else bad
    nodes = _live_nodes(e)
    with pytest.raises(ValueError, match=f"token id {tok}"):
        e.new_sequence([1, 2, tok])
    assert _live_nodes(e) == nodes
    s = e.new_sequence([1, 2, 3])
    with pytest.raises(ValueError, match=f"token id {tok}"):
        s.append_tokens([4, tok])
    assert s.tokens == [1, 2, 3]  # nothing half-appended
    with pytest.raises(ValueError, match="stop_token_ids"):
        e.submit(s, SamplingParams(stop_token_ids=[tok]))
    assert s.handle is None
    r = e.generate(s, SamplingParams(temperature=0, max_tokens=2, ignore_eos=True))[0]
    assert len(r.token_ids) == 2
    s.release()


def test_token_ids_must_be_integers(make_engine):
    e = make_engine()
    with pytest.raises(TypeError, match="token"):
        e.new_sequence([1, 2.5])
    with pytest.raises(TypeError, match="prompt"):
        e.new_sequence(42)


def test_generate_with_mismatched_lists_is_an_error(make_engine):
    e = make_engine()
    seqs = [e.new_sequence(PROMPT) for _ in range(3)]
    with pytest.raises(ValueError, match="3 sequences but 2 SamplingParams"):
        e.generate(seqs, [SamplingParams(), SamplingParams()])
    assert all(s.handle is None for s in seqs)  # nothing was submitted
    for s in seqs:
        s.release()


def test_another_engines_sequence_is_refused_not_stepped_forever(make_engine):
    """A sequence is scheduled only by the engine that made it: handing it to
    another one used to step that engine forever (nothing of its own to run)."""
    a, b = make_engine(), make_engine()
    s = a.new_sequence(PROMPT)
    p = SamplingParams(temperature=0, max_tokens=2)
    for call in (lambda: b.generate([s], p), lambda: b.submit(s, p), lambda: b.flush([s]),
                 lambda: b.submit_score(s, [5])):
        with pytest.raises(ValueError, match="belongs to another engine"):
            call()
    with pytest.raises(TypeError, match="expected a Sequence"):
        b.generate(["a prompt"], p)
    assert s.handle is None and b.pool.used == 0
    assert len(a.generate(s, p)[0].token_ids) == 2  # its own engine still runs it
    s.release()


@pytest.mark.parametrize("kw, name", [
    (dict(max_batch_tokens=0), "max_batch_tokens"),
    (dict(max_batch_tokens=-5), "max_batch_tokens"),
    (dict(max_batch_tokens=1.5), "max_batch_tokens"),
    (dict(max_wait_steps=0), "max_wait_steps"),
    (dict(cascade="sometimes"), "cascade"),
    (dict(page_size=0), "page_size"),
    (dict(num_pages=0), "num_pages"),
])
def test_bad_engine_sizes_name_the_argument(tiny_model_dir, kw, name):
    with pytest.raises((ValueError, TypeError), match=name):
        Engine(tiny_model_dir, device="cpu", **kw)


def test_nan_logits_raise_naming_the_step_and_leak_nothing(make_engine):
    e = make_engine()
    s = e.new_sequence(PROMPT)
    with torch.no_grad():  # bad weights: one NaN in the final norm poisons every logit
        for name, p in e.runner.model.named_parameters():
            if name.endswith("norm.weight") and "layers" not in name:
                p[0] = float("nan")
    h = e.submit(s, SamplingParams(temperature=0.8, seed=0, max_tokens=4))
    with pytest.raises(ModelOutputError, match=r"NaN .*step \d+"):
        e.run([h])
    assert h.done and h.result.finish_reason == "error"
    s.release()
    check_invariants(e.pool, [e.tree], [e.cache] if e.cache else [])


# -- concurrent callers ----------------------------------------------------------------


def test_four_threads_calling_generate_get_their_seeded_tokens(make_engine):
    e = make_engine()
    params = [SamplingParams(temperature=0.9, seed=10 + i, max_tokens=12, ignore_eos=True)
              for i in range(4)]
    ref = []
    for i in range(4):
        s = e.new_sequence(f"{PROMPT} {i}")
        ref.append(e.generate(s, params[i])[0].token_ids)
        s.release()
    got: dict[int, list[int]] = {}
    errors: list[BaseException] = []
    start = threading.Barrier(4)

    def worker(i: int) -> None:
        try:
            start.wait()
            for _ in range(3):
                s = e.new_sequence(f"{PROMPT} {i}")
                kids = s.fork(2)
                out = e.generate(kids, [params[i]] * 2)
                assert out[0].token_ids == out[1].token_ids
                got.setdefault(i, out[0].token_ids)
                assert out[0].token_ids == got[i]
                for k in kids:
                    k.release()
                s.release()
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    assert [got[i] for i in range(4)] == ref


# -- preemption of forked branches -------------------------------------------------------


def _fork_workload(e, prompt_ids, kids, max_tokens):
    root = e.new_sequence(prompt_ids)
    branches = root.fork(kids)
    out = e.generate(branches, [SamplingParams(temperature=0.8, seed=7 + i, max_tokens=max_tokens,
                                               ignore_eos=True) for i in range(kids)])
    for b in branches:
        b.release()
    root.release()
    return [r.token_ids for r in out]


def test_forked_branches_preempted_in_a_small_pool_complete_and_match(make_engine):
    # 377 prompt tokens (24 pages) forked 4 ways; one whole branch needs 26 of 30 pages
    prompt = [1 + (i * 7) % 300 for i in range(377)]
    ref = _fork_workload(make_engine(num_pages=512), prompt, 4, 32)
    e = make_engine(num_pages=30)
    got = _fork_workload(e, prompt, 4, 32)
    assert e.stats["preemptions"] > 0
    assert got == ref


@settings(max_examples=6, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kids=st.integers(1, 5), prompt_len=st.integers(20, 120), max_tokens=st.integers(1, 40),
       slack=st.integers(0, 12))
def test_any_fork_workload_whose_largest_leaf_fits_completes(make_engine, kids, prompt_len,
                                                             max_tokens, slack):
    prompt = [1 + (i * 11) % 300 for i in range(prompt_len)]
    leaf_pages = -(-(prompt_len + max_tokens) // 16)
    ref = _fork_workload(make_engine(num_pages=512), prompt, kids, max_tokens)
    e = make_engine(num_pages=leaf_pages + 1 + slack)  # +1: a forked leaf's copy-on-write page
    assert _fork_workload(e, prompt, kids, max_tokens) == ref


@pytest.mark.parametrize("n", [0, -1, 2.5, "2", 10 ** 20])
def test_bad_fork_counts_are_rejected(make_engine, n):
    e = make_engine()
    s = e.new_sequence(PROMPT)
    nodes = _live_nodes(e)
    with pytest.raises((ValueError, TypeError), match="fork"):
        s.fork(n)
    assert _live_nodes(e) == nodes and not s.frozen
    s.release()
