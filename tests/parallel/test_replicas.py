"""Data-parallel replicas (2 engine processes on the CPU) give what one engine
gives, in input order, and route equal prompts to the same replica."""

import multiprocessing as mp

import pytest
from replica_programs import answer_twice, num_states
from tp_fixtures import one_torch_thread, tp_model_dir  # noqa: F401 (fixtures)

from dendrite.engine import Engine
from dendrite.parallel.replicas import Replicas, route

QUESTIONS = ["What is 6 * 7?", "Name a colour.", "What is 6 * 7?", "Is the sky blue?",
             "Name a colour.", "Say yes or no.", "What is 6 * 7?", "Count to three."]


@pytest.fixture(scope="module")
def reps(tp_model_dir):
    r = Replicas(tp_model_dir, 2, num_pages=256)
    yield r
    r.close()
    assert not [p for p in mp.active_children() if p.name.startswith("dendrite-replica")]


def test_same_results_as_one_engine(reps, tp_model_dir):
    batch = [{"question": q} for q in QUESTIONS]
    got = reps.run_batch(answer_twice, batch, seed=5, key=lambda a: a["question"],
                         summarize=num_states)
    engine = Engine(tp_model_dir, device="cpu", num_pages=256)
    want = answer_twice.run_batch(engine, batch, seed=5)
    engine.close()
    assert [g.value for g in got] == [w.value for w in want]
    assert [g.text for g in got] == [w.text for w in want]
    assert {g.replica for g in got} == {0, 1}  # both replicas worked
    by_question = {}
    for q, g in zip(QUESTIONS, got):  # equal prompts went to the same replica
        assert by_question.setdefault(q, g.replica) == g.replica
        assert g.summary > 0


def test_route_equal_prefixes_together_and_balanced():
    keys = [b"a", b"b", b"a", b"c", b"d", b"a", b"e", b"f"]
    where = route(keys, 2)
    assert len({where[i] for i in (0, 2, 5)}) == 1
    loads = [where.count(r) for r in range(2)]
    assert max(loads) <= 5  # ceil(8 / 2 * 1.25)
    # one hot prompt cannot take more than its group; the rest spreads
    hot = route([b"x"] * 6 + [b"y", b"z", b"w", b"v"], 2)
    assert len(set(hot[:6])) == 1
    assert hot[6:].count(1 - hot[0]) >= 3


def test_page_aligned_prefix_routing(reps):
    long = "The quick brown fox jumps over the lazy dog. " * 20
    a, b = long + "First question?", long + "Second, different question?"
    assert reps.prefix_key(a) == reps.prefix_key(b)  # same first pages
    assert reps.prefix_key("red") != reps.prefix_key("blue")


def test_bad_program_and_args(reps):
    local = type(answer_twice)(lambda s: None)
    with pytest.raises(TypeError, match="module-level @program"):
        reps.run_batch(local, [{}])
    with pytest.raises(TypeError, match="unexpected argument"):
        reps.run_batch(answer_twice, [{"question": "x"}], temprature=0)
    with pytest.raises(ValueError, match="replicas must be >= 1"):
        Replicas("unused", 0)
