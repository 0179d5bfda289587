"""Seeds: a run with seed S is reproducible; every state's seed derives from S and its path."""

from __future__ import annotations

import dendrite.program as dp
from dendrite.program.state import derive_seed


@dp.program
def tree(s, question: str = "Q", n: int = 3):
    s += f"Question: {question}\n"
    kids = s.fork(n)
    kids.gen("a", max_tokens=4, temperature=1.0, ignore_eos=True)
    best = dp.prune(kids, keep=2)
    grand = [g for k in best for g in k.fork(2)]
    for g in grand:
        g.gen("b", max_tokens=3, temperature=1.0, ignore_eos=True)
    return [g.text for g in grand]


def texts(result):
    return [(n.path, n.seed, n.own_text, n.pruned) for n in result.tree]


def test_same_seed_same_tree(make_engine):
    a = tree.run(make_engine(), seed=7)
    b = tree.run(make_engine(), seed=7)
    assert a.value == b.value
    assert texts(a) == texts(b)


def test_different_seeds_differ(make_engine):
    a = tree.run(make_engine(), seed=1)
    b = tree.run(make_engine(), seed=2)
    assert texts(a) != texts(b)


def test_state_seeds_derive_from_run_seed_and_path(make_engine):
    r = tree.run(make_engine(), seed=5)
    for n in r.tree:
        assert n.seed == derive_seed(5, n.path)
    assert len({n.seed for n in r.tree}) == len(r.tree)
    assert derive_seed(None, "0") is None


def test_run_batch_instance_i_matches_run_with_seed_plus_i(make_engine):
    batch = tree.run_batch(make_engine(), [dict(question="A"), dict(question="B")], seed=10)
    one = tree.run(make_engine(), question="B", seed=11)
    assert batch[1].value == one.value
