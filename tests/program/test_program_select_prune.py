"""select / prune / scorers: ranking, marks on the tree, release, batched judges."""

from __future__ import annotations

import math

import pytest

import dendrite.program as dp
from dendrite.program import score


def _sample(s, n, tokens=3):
    s += "Q:"
    kids = s.fork(n, label="c")
    kids.gen("x", max_tokens=tokens, ignore_eos=True, temperature=1.0)
    return kids


def test_select_picks_the_max_and_prunes_the_rest(engine):
    @dp.program
    def prog(s):
        kids = _sample(s, 4)
        order = {k.id: i for i, k in enumerate(kids)}
        best = dp.select(kids, by=lambda k: order[k.id] % 3)  # index 2 scores highest
        return kids, best

    r = prog.run(engine, seed=0)
    kids, best = r.value
    assert best is kids[2]
    assert best.score == 2 and best.node.selected and not best.node.pruned
    for k in kids:
        if k is not best:
            assert k.node.pruned and k.released
    assert [k.score for k in kids] == [0, 1, 2, 0]


def test_prune_keeps_k_best_first_with_stable_ties(engine):
    @dp.program
    def prog(s):
        kids = _sample(s, 5)
        idx = {k.id: i for i, k in enumerate(kids)}
        kept = dp.prune(kids, keep=3, by=lambda k: [1, 3, 3, 0, 2][idx[k.id]])
        return kids, kept

    r = prog.run(engine, seed=0)
    kids, kept = r.value
    assert [k.id for k in kept] == [kids[1].id, kids[2].id, kids[4].id]
    assert [k.node.pruned for k in kids] == [True, False, False, True, False]
    assert isinstance(kept, dp.StateGroup)


def test_default_scorer_is_mean_logprob(engine):
    @dp.program
    def prog(s):
        kids = _sample(s, 4)
        best = dp.select(kids)
        return kids, best

    r = prog.run(engine, seed=1)
    kids, best = r.value
    assert best.logprob == max(k.logprob for k in kids)
    assert best.score == pytest.approx(best.logprob)


def test_scorers(engine):
    @dp.program
    def prog(s):
        kids = _sample(s, 2, tokens=4)
        kids[0]["rating"] = "7"
        kids[1]["rating"] = "oops"
        return kids

    kids = prog.run(engine, seed=2).value
    k = kids[0]
    assert score.sum_logprob(k) == pytest.approx(k.sum_logprob)
    lp = score.length_penalty(1.0)
    assert lp(k) == pytest.approx(k.sum_logprob / ((5 + 4) / 6))
    assert score.length_penalty(0.0)(k) == pytest.approx(k.sum_logprob)
    assert score.capture("rating")(kids[0]) == 7.0
    assert score.capture("rating")(kids[1]) == -math.inf
    assert score.as_scorer("rating")(kids[0]) == 7.0
    assert score.as_scorer(None) is score.logprob
    with pytest.raises(TypeError):
        score.as_scorer(3)


def test_judge_scores_by_a_batched_model_generation(make_engine):
    def run(n):
        e = make_engine()

        @dp.program
        def prog(s):
            kids = _sample(s, n, tokens=2)
            kids.wait()
            before = e.stats["steps"]
            j = score.judge("\nScore 0-9: ", regex=r"[0-9]", max_tokens=1)
            vals = j.score_all(kids)
            return vals, e.stats["steps"] - before

        return prog.run(e, seed=0)

    r1, r4 = run(1), run(4)
    vals, steps4 = r4.value
    assert len(vals) == 4 and all(0 <= v <= 9 for v in vals)
    assert steps4 == r1.value[1]  # 4 judges cost the same steps as 1
    judges = [n for n in r4.tree if n.label == "judge"]
    assert len(judges) == 4 and all(n.released for n in judges)


def test_judge_with_a_fresh_context_and_a_template_callable(engine):
    @dp.program
    def prog(s):
        kids = _sample(s, 2, tokens=2)
        j = score.judge(lambda k: f"Text: {k['x']}\nScore 0-9: ", regex=r"[0-9]",
                        max_tokens=1, context="fresh")
        return dp.select(kids, by=j)

    r = prog.run(engine, seed=0)
    judges = [n for n in r.tree if n.label == "judge"]
    assert len(judges) == 2 and all(n.parent is None for n in judges)
    assert judges[0].own_text.startswith("Text: ")
    assert 0 <= r.value.score <= 9
