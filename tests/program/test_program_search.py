"""The search library on a tiny model: structure of the explored trees."""

from __future__ import annotations

import pytest

import dendrite.program as dp
from dendrite import search as S
from dendrite.program import score

STEP = dict(max_tokens=3, stop=None, temperature=1.0, ignore_eos=True)


def labelled(r, label):
    return [n for n in r.tree if n.label == label]


def test_tot_bfs_keeps_top_k_per_level(engine):
    r = S.tot_bfs.run(engine, prompt="Q: 2+2?\n", width=3, keep=2, depth=2, step=STEP, seed=0)
    best = r.value
    nodes = labelled(r, "thought")
    assert len(nodes) == 3 + 2 * 3
    level1 = [n for n in nodes if r.tree.depth(n.id) == 1]
    level2 = [n for n in nodes if r.tree.depth(n.id) == 2]
    assert sum(n.pruned for n in level1) == 1 and sum(n.pruned for n in level2) == 4
    assert best.depth == 2 and best.node.selected and best.parent.node.selected
    assert best.score == max(n.score for n in level2)


def test_tot_dfs_backtracks(engine):
    seen = []

    def goal(s):
        seen.append(s.id)
        return len(seen) >= 3  # the first two leaves fail

    r = S.tot_dfs.run(engine, prompt="Q\n", width=2, depth=2, step=STEP, goal=goal, seed=0)
    assert len(seen) == 3
    back = [n for n in r.tree if n.info.get("backtracked")]
    assert back, "a failed subtree should have been abandoned"
    assert r.value.depth == 2 and r.value.id == seen[-1]


def test_tot_dfs_threshold_prunes_everything(engine):
    r = S.tot_dfs.run(engine, prompt="Q\n", width=2, depth=2, step=STEP, threshold=1e9, seed=0)
    kids = labelled(r, "thought")
    assert len(kids) == 2 and all(n.pruned for n in kids if n.id != r.value.id)


def test_beam_search(engine):
    r = S.beam_search.run(engine, prompt="Once", width=2, depth=3, step=STEP, seed=0)
    best = r.value
    assert best.depth == 3
    assert len(labelled(r, "beam")) == 2 + 4 + 4
    lp = score.length_penalty(1.0)
    assert best.score == pytest.approx(lp(best))


@pytest.mark.parametrize("policy", ["uct", "puct"])
def test_mcts(engine, policy):
    r = S.mcts.run(engine, prompt="Q: 3*3?\n", iterations=4, width=2, depth=2, step=STEP,
                   policy=policy, seed=0)
    root = r.tree[r.tree.roots[0]]
    # the first iteration expands the root: both children back up a value
    assert root.info["visits"] >= 4 and sum(
        r.tree[c].info["visits"] for c in root.children) == root.info["visits"]
    nodes = labelled(r, "node")
    assert all("visits" in n.info for n in nodes)
    # the answer is on the most-visited path
    path = [n for n in nodes if n.selected]
    assert path and r.value.node.selected
    if policy == "puct":
        for n in nodes:
            assert 0.0 <= n.info["prior"] <= 1.0


def test_mcts_rollouts_and_model_value(engine):
    judge = score.judge("\nScore 0-9: ", regex=r"[0-9]", max_tokens=1)
    r = S.mcts.run(engine, prompt="Q\n", iterations=2, width=2, depth=2, step=STEP, by=judge,
                   rollouts=2, parallel=2, seed=0)
    rollouts = labelled(r, "rollout")
    assert rollouts and all(n.released for n in rollouts)
    assert labelled(r, "judge")
    assert r.value.node.selected


def test_mcts_value_from_a_callable(engine):
    r = S.mcts.run(engine, prompt="Q\n", iterations=3, width=2, depth=1, step=STEP,
                   by=lambda s: 1.0 if s.text.endswith("a") else 0.0, seed=0)
    # iteration 1 expands the root (2 new children); then each picks a depth-1 leaf
    assert r.tree[r.tree.roots[0]].info["visits"] == 2 + 1 + 1


def test_best_of_n(engine):
    r = S.best_of_n.run(engine, prompt="Q\n", n=4, step=STEP, seed=0)
    samples = labelled(r, "sample")
    assert len(samples) == 4 and sum(n.selected for n in samples) == 1


def test_self_consistency_majority(engine):
    def step(s):
        s += "The answer is "
        s.gen("answer", regex=r"[12]", max_tokens=2)

    r = S.self_consistency.run(engine, prompt="Q\n", n=7, step=step, seed=0)
    answers = [n.info["answer"] for n in labelled(r, "sample")]
    assert r.value in (1, 2)
    assert answers.count(r.value) >= 4
    assert r["answer"] == r.value and sum(r["votes"].values()) == 7


def test_search_programs_compose_inline(engine):
    @dp.program
    def solve(s, q: str):
        s += q
        best = S.tot_bfs(s, width=2, keep=1, depth=1, step=STEP)
        best += " So "
        best.gen("final", max_tokens=2, ignore_eos=True)
        return best["final"]

    r = solve.run(engine, q="Q: hi\n", seed=0)
    assert isinstance(r.value, str)
