"""ToT BFS with per-level prompts and steps, keep-all, and the whole last level
(`tot_frontier`): what SGLang's tree-of-thought benchmarks need."""

from __future__ import annotations

import pytest

import dendrite.program as dp
from dendrite import search as S


@pytest.fixture(scope="module")
def uncached_engine(make_engine):
    """No prefix cache: every page in use belongs to a live sequence."""
    return make_engine(prefix_cache=False)


def gen_step(name: str, n: int):
    """A step that generates exactly ``n`` tokens into capture ``name``."""
    return dict(name=name, max_tokens=n, stop=None, temperature=1.0, ignore_eos=True)


def test_keep_all_returns_every_leaf_with_per_level_captures(engine):
    r = S.tot_frontier.run(
        engine,
        prompt="Q: 1+1?",
        width=3,
        depth=2,
        step=[gen_step("plan", 2), gen_step("answer", 3)],
        level_prompts=[" PLAN:", " ANSWER:"],
        seed=0,
    )
    leaves = r.value
    assert len(leaves) == 9
    assert len({leaf.id for leaf in leaves}) == 9
    # 3 plans + 9 answers, each its own generation, none pruned
    gens = [n for n in r.tree if any(seg.kind == "gen" for seg in n.segments)]
    assert len(gens) == 12 and not any(n.pruned for n in r.tree)
    parents = {leaf.parent.id for leaf in leaves}
    assert len(parents) == 3  # three leaves under each plan
    for leaf in leaves:
        caps = leaf.captures
        assert set(caps) >= {"plan", "answer"}
        assert caps["plan"] == leaf.parent.captures["plan"]  # inherited from the fork point
        text = leaf.text
        i, j = text.index(" PLAN:"), text.index(" ANSWER:")
        assert text.startswith("Q: 1+1?") and i < text.index(caps["plan"], i) < j
        assert text.endswith(caps["answer"])
        assert leaf.num_gen_tokens == 2 + 3


def test_level_prompt_is_appended_before_the_fork(engine):
    """The level's text belongs to the parent (shared KV), not copied into each child."""
    r = S.tot_frontier.run(
        engine, prompt="Q", width=2, depth=2, step=gen_step("x", 1),
        level_prompts=[" L0", " L1"], seed=1,
    )
    texts = {n.id: [seg.text for seg in n.segments if seg.kind == "text"] for n in r.tree}
    root = r.tree.roots[0]
    assert texts[root] == ["Q", " L0"]
    level1 = [n for n in r.tree if n.parent == root]
    assert len(level1) == 2 and all(texts[n.id] == [" L1"] for n in level1)
    level2 = [n for n in r.tree if n.parent in {m.id for m in level1}]
    assert len(level2) == 4 and all(texts[n.id] == [] for n in level2)


def test_keep_all_has_no_level_barrier(make_engine):
    """A branch starts its next level when its own step is done, not when the
    slowest sibling's is: 2+12 and 12+2 tokens take ~14 steps, not 12+12."""
    engine = make_engine()

    def level1(s):
        s.gen("a", max_tokens=2 if s.node.path.endswith(".0") else 12, stop=None, ignore_eos=True)

    def level2(s):
        short_parent = s.parent.node.path.endswith(".0")
        s.gen("b", max_tokens=12 if short_parent else 2, stop=None, ignore_eos=True)

    r = S.tot_frontier.run(engine, prompt="Q: go", width=2, depth=2, step=[level1, level2], seed=0)
    assert len(r.value) == 4
    assert all(leaf.num_gen_tokens == 14 for leaf in r.value)
    # a level barrier costs >= 12 + 12 decode steps; without it ~14 plus a few prefills
    assert r.steps < 20, r.steps


def test_keep_k_returns_the_best_first(engine):
    r = S.tot_frontier.run(
        engine, prompt="Q: 3+4?", width=3, keep=2, depth=2, step=gen_step("t", 2), seed=3
    )
    leaves = list(r.value)
    assert len(leaves) == 2
    assert leaves[0].score >= leaves[1].score
    level2 = [n for n in r.tree if r.tree.depth(n.id) == 2]
    assert len(level2) == 6 and sum(n.pruned for n in level2) == 4


def test_tot_bfs_keep_none_selects_best_of_last_level(engine):
    r = S.tot_bfs.run(engine, prompt="Q", width=2, keep=None, depth=2, step=gen_step("t", 2), seed=0)
    level2 = [n for n in r.tree if r.tree.depth(n.id) == 2]
    assert len(level2) == 4
    assert r.value.depth == 2 and r.value.score == max(n.score for n in level2)
    assert r.value.node.selected and r.value.parent.node.selected


def test_tot_bfs_per_level_prompts_inline(engine):
    @dp.program
    def solve(s, q: str):
        s += q
        best = S.tot_bfs(
            s, width=2, keep=1, depth=2, level_prompts=[" A:", None],
            step=[gen_step("first", 1), gen_step("second", 1)],
        )
        return best.captures

    caps = solve.run(engine, q="Q", seed=0).value
    assert set(caps) >= {"first", "second"}


def test_one_level_prompt_string_repeats_every_level(engine):
    r = S.tot_frontier.run(engine, prompt="Q", width=1, depth=3, step=gen_step("x", 1),
                           level_prompts=" NEXT:", seed=0)
    (leaf,) = r.value
    assert leaf.text.count(" NEXT:") == 3


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(step=[gen_step("a", 1)], depth=2), "step has 1 entries but depth is 2"),
        (dict(level_prompts=["x", "y", "z"], depth=2), "level_prompts has 3 entries but depth is 2"),
        (dict(keep=0), "keep must be >= 1 or None"),
        (dict(depth=-1), "depth must be >= 0"),
    ],
)
def test_bad_arguments_are_named(uncached_engine, kwargs, match):
    with pytest.raises(ValueError, match=match):
        S.tot_frontier.run(uncached_engine, prompt="Q", width=2, **kwargs)
    assert uncached_engine.pool.used == 0  # the failed run gave its pages back
