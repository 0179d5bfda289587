"""Draft trees: static width x depth, dynamic (EAGLE-2) with a node budget."""

import pytest

from dendrite.speculative.tree import DraftTree, TreeShape, build_dynamic, build_static


def expand_from(table):
    """A drafter over a fixed table: path tuple -> [(token, prob)], best first."""
    def expand(reqs):
        return [table.get(r.path, [])[:r.k] for r in reqs]
    return expand


TABLE = {
    (): [(1, 0.6), (2, 0.3), (3, 0.1)],
    (1,): [(4, 0.9), (5, 0.1)],
    (2,): [(6, 0.5), (7, 0.5)],
    (3,): [(8, 1.0)],
    (1, 4): [(9, 0.8), (10, 0.2)],
    (2, 6): [(11, 1.0)],
}


def test_static_width_by_depth():
    [t] = build_static(expand_from(TABLE), 1, width=2, depth=3)
    assert sorted(map(tuple, (t.path_tokens(p[-1]) for p in t.paths()))) == [(1, 4, 9), (2, 6, 11)]
    assert len(t) == 6 and all(t.depth(i) <= 3 for i in range(len(t)))
    [chain] = build_static(expand_from(TABLE), 1, width=1, depth=2)
    assert chain.tokens == [1, 4] and chain.paths() == [[0, 1]]


def test_static_depth_per_row_and_empty_rows():
    trees = build_static(expand_from(TABLE), 3, width=1, depth=[2, 0, 5])
    assert trees[0].tokens == [1, 4] and len(trees[1]) == 0 and trees[2].tokens == [1, 4, 9]


def test_dynamic_keeps_the_most_likely_nodes_as_a_tree():
    [t] = build_dynamic(expand_from(TABLE), 1, top_k=2, depth=3, budget=4)
    assert len(t) == 4
    cum = sorted((t.cum_prob(i) for i in range(len(t))), reverse=True)
    # The four best cumulative probabilities of the full expansion: 0.6, 0.54, 0.432, 0.3.
    assert cum == pytest.approx([0.6, 0.54, 0.432, 0.3])
    for i, p in enumerate(t.parents):  # parents precede children
        assert p < i


def test_tree_helpers_and_bad_shapes():
    t = DraftTree()
    a = t.add(-1, 5, 0.5)
    t.add(a, 6, 0.5)
    assert t.cum_prob(1) == 0.25 and t.leaves() == [1] and t.child_with_token(-1, 5) == 0
    with pytest.raises(ValueError, match="parent"):
        t.add(7, 1)
    with pytest.raises(ValueError, match="kept but its parent"):
        t.keep([1])
    with pytest.raises(ValueError, match="tree must be one of static, dynamic"):
        TreeShape(kind="beam")
    with pytest.raises(ValueError, match="depth must be an int >= 1"):
        TreeShape(depth=0)


def test_trim_drops_unlikely_leaves_until_verification_fits():
    [t] = build_dynamic(expand_from(TABLE), 1, top_k=3, depth=3, budget=10)
    assert t.verify_tokens > 6
    small = t.trim(6)
    assert small.verify_tokens <= 6
    # Kept: the likeliest path (cumulative 0.6, 0.54, 0.432) and, in the two
    # tokens left, the next likeliest first token (0.3).
    assert sorted(small.path_tokens(p[-1]) for p in small.paths()) == [[1, 4, 9], [2]]
    assert DraftTree().verify_tokens == 1 and t.trim(1).tokens == []
