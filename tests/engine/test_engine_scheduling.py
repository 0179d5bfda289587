"""Scheduler behaviour through the engine: preemption recomputes exactly,
priorities order the work, nothing starves, no page leaks, clear errors."""

import random

import pytest

from dendrite.engine import LeafTooLarge
from dendrite.kv import check_invariants
from dendrite.sampling import SamplingParams

PROMPT = "Question: Natalia sold clips to 48 of her friends in April, and then she sold"


def _params(i, n=48):
    return SamplingParams(temperature=0.9, seed=100 + i, max_tokens=n, ignore_eos=True)


def test_preempted_leaves_produce_unpreempted_tokens(make_engine):
    roomy = make_engine(num_pages=512)
    ref = roomy.generate([roomy.new_sequence(PROMPT + str(i)) for i in range(6)],
                         [_params(i) for i in range(6)])
    # 6 leaves x ~5 pages each do not fit in 20 pages: the engine must preempt
    tight = make_engine(num_pages=20, prefix_cache=False)
    seqs = [tight.new_sequence(PROMPT + str(i), priority=float(i % 3)) for i in range(6)]
    got = tight.generate(seqs, [_params(i) for i in range(6)])
    assert tight.stats["preemptions"] > 0
    assert [r.token_ids for r in got] == [r.token_ids for r in ref]
    check_invariants(tight.pool, [tight.tree], [])


def test_priority_order_respected(make_engine):
    # a budget of one prompt's worth of tokens: only one leaf prefills per step
    e = make_engine(max_batch_tokens=24, prefix_cache=False)
    seqs = [e.new_sequence(PROMPT, priority=p) for p in (0.0, 5.0, 1.0, 3.0)]
    hs = [e.submit(s, SamplingParams(temperature=0, max_tokens=1, ignore_eos=True))
          for s in seqs]
    order = []
    while not all(h.done for h in hs):
        for h in e.step():
            order.append(seqs.index(h.seq))
    assert order == [1, 3, 2, 0]


def test_no_starvation_under_random_workload(make_engine):
    rng = random.Random(0)
    e = make_engine(num_pages=40, max_batch_tokens=32, max_wait_steps=8)
    live, finished, steps = [], 0, 0
    waits = {}
    for i in range(60):
        if len(live) < 10:
            s = e.new_sequence(PROMPT[: rng.randint(5, len(PROMPT))],
                               priority=rng.choice([0.0, 0.0, 1.0, 10.0]))
            h = e.submit(s, SamplingParams(temperature=0.8, seed=i,
                                           max_tokens=rng.randint(1, 12), ignore_eos=True))
            live.append(h)
            waits[id(h)] = 0
        done = e.step()
        steps += 1
        for h in live:
            waits[id(h)] = 0 if h in done or h.done else waits[id(h)] + 1
            assert waits[id(h)] < 200, "a runnable leaf starved"
        for h in done:
            finished += 1
            h.seq.release()
        live = [h for h in live if not h.done]
        if rng.random() < 0.1 and live:  # cancel one
            victim = live.pop(rng.randrange(len(live)))
            victim.seq.release()
    while live:
        for h in e.step():
            h.seq.release()
        live = [h for h in live if not h.done]
    for h in live:
        h.seq.release()
    assert finished > 20
    check_invariants(e.pool, [e.tree], [e.cache])


def test_one_leaf_too_large_is_a_clear_error_and_leaks_nothing(make_engine):
    e = make_engine(num_pages=4, prefix_cache=False)
    s = e.new_sequence(" ".join(["fox"] * 200))
    with pytest.raises(LeafTooLarge, match="KV page"):
        e.generate(s, SamplingParams(max_tokens=4))
    s.release()
    assert e.pool.used == 0
