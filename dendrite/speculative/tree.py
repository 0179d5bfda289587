"""Draft trees: what a drafter proposes after a context, and the two ways to grow one.

A `DraftTree` is a tree of draft tokens hanging off the context's last token
(the implicit root, index -1). Node `i` has a token, a parent (an earlier
node, or -1) and the drafter's probability of that token given its parent's
path (`probs[i]`; 1.0 for a drafter that only proposes tokens). Nodes are in
topological order: a parent always comes before its children.

Two builders grow the trees of a batch of rows level by level, calling the
drafter's batched `expand` once per level (so a draft model runs one forward
per depth for every row of the step):

* `build_static` (width x depth): the root gets the drafter's `width` best
  first tokens, and each of those branches continues as a chain of the
  drafter's best next token, to `depth` tokens (`width` paths, at most
  `width * depth` nodes; width 1 is the usual draft chain).
* `build_dynamic` (EAGLE-2 style): at every depth the `top_k` nodes of the
  frontier with the highest cumulative draft probability (product of `probs`
  along the path) are expanded with their `top_k` best children each; at the
  end the `budget` nodes of highest cumulative probability are kept. A
  child's cumulative probability never exceeds its parent's, and ties go to
  the shallower node, so what is kept is always a tree.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["DraftTree", "Expansion", "TreeShape", "build", "build_dynamic", "build_static"]

#: Tree kinds `TreeShape.kind` accepts.
TREE_KINDS = ("static", "dynamic")


@dataclass
class DraftTree:
    """Draft tokens after a context; node -1 is the context's last token."""

    tokens: list[int] = field(default_factory=list)
    parents: list[int] = field(default_factory=list)
    probs: list[float] = field(default_factory=list)
    #: node (-1: the root) -> the draft distribution (float [V]) its children
    #: were drawn from, independently; a node without one has proposed
    #: children (point masses). Verification uses it (recursive rejection).
    dists: dict[int, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.tokens)

    def add(self, parent: int, token: int, prob: float = 1.0) -> int:
        """Append a node under `parent` (-1: the root); returns its index."""
        if not -1 <= parent < len(self.tokens):
            raise ValueError(f"parent must be -1 or an existing node index, got {parent}")
        self.tokens.append(int(token))
        self.parents.append(int(parent))
        self.probs.append(float(prob))
        return len(self.tokens) - 1

    def depth(self, i: int) -> int:
        """Draft tokens on the path to node `i` (1 for a child of the root, 0 for the root)."""
        d = 0
        while i >= 0:
            i = self.parents[i]
            d += 1
        return d

    def path(self, i: int) -> list[int]:
        """Node indices from the root's child down to `i` (empty for the root)."""
        out = []
        while i >= 0:
            out.append(i)
            i = self.parents[i]
        return out[::-1]

    def path_tokens(self, i: int) -> list[int]:
        """Draft tokens from the root down to node `i`."""
        return [self.tokens[j] for j in self.path(i)]

    def cum_prob(self, i: int) -> float:
        """Product of the draft probabilities along the path to `i` (1 for the root)."""
        p = 1.0
        for j in self.path(i):
            p *= self.probs[j]
        return p

    def children(self, i: int) -> list[int]:
        """Indices of the children of node `i` (-1: of the root), in order."""
        return [j for j, p in enumerate(self.parents) if p == i]

    def child_with_token(self, i: int, token: int) -> int | None:
        """The child of `i` whose token is `token`, or None."""
        for j, p in enumerate(self.parents):
            if p == i and self.tokens[j] == token:
                return j
        return None

    def leaves(self) -> list[int]:
        """Nodes without children, in index order."""
        has_child = set(self.parents)
        return [i for i in range(len(self.tokens)) if i not in has_child]

    def paths(self) -> list[list[int]]:
        """Root-to-leaf node paths, one per leaf (none for an empty tree)."""
        return [self.path(leaf) for leaf in self.leaves()]

    @property
    def verify_tokens(self) -> int:
        """Tokens its verification runs: each root-to-leaf path with the last token."""
        return sum(1 + len(p) for p in self.paths()) if self.tokens else 1

    def trim(self, max_tokens: int) -> DraftTree:
        """The subtree whose `verify_tokens` fit `max_tokens`: leaves of lowest
        cumulative probability go first (the deeper one on a tie)."""
        nodes = set(range(len(self.tokens)))
        cum = [self.cum_prob(i) for i in range(len(self.tokens))]
        depth = [self.depth(i) for i in range(len(self.tokens))]
        tree = self
        while nodes and tree.verify_tokens > max_tokens:
            has_child = {self.parents[i] for i in nodes}
            leaves = [i for i in nodes if i not in has_child]
            nodes.remove(min(leaves, key=lambda i: (cum[i], -depth[i], -i)))
            tree = self.keep(sorted(nodes))
        return tree

    def keep(self, nodes: Sequence[int]) -> DraftTree:
        """The subtree of `nodes` (ancestor-closed), renumbered in the original order."""
        kept = sorted(set(nodes))
        index = {old: new for new, old in enumerate(kept)}
        out = DraftTree()
        for old in kept:
            parent = self.parents[old]
            if parent >= 0 and parent not in index:
                raise ValueError(f"node {old} is kept but its parent {parent} is not")
            out.add(index[parent] if parent >= 0 else -1, self.tokens[old], self.probs[old])
        # A distribution stays only with all of its children: a subset chosen
        # by token is no longer a set of independent draws from it.
        for node, dist in self.dists.items():
            if (node < 0 or node in index) and all(c in index for c in self.children(node)):
                out.dists[index[node] if node >= 0 else -1] = dist
        return out


@dataclass(frozen=True)
class TreeShape:
    """How big a draft tree may grow (see the module docstring)."""

    kind: str = "static"
    depth: int = 4  # draft tokens on the longest path
    width: int = 1  # static: branches at the first draft token
    top_k: int = 4  # dynamic: nodes expanded per depth, and children per expanded node
    budget: int = 16  # dynamic: nodes kept

    def __post_init__(self) -> None:
        if self.kind not in TREE_KINDS:
            raise ValueError(f"tree must be one of {', '.join(TREE_KINDS)}, got {self.kind!r}")
        for name in ("depth", "width", "top_k", "budget"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an int >= 1, got {v!r}")

    @property
    def max_nodes(self) -> int:
        """The most nodes a tree of this shape holds."""
        if self.kind == "static":
            return self.width * self.depth
        return self.budget


@dataclass(frozen=True)
class Expansion:
    """One node a builder asks the drafter to expand: its next-token candidates.

    `row` is the tree's index in the batch, `node` the node (-1: the root),
    `parent` its parent (-1: the root; -2 for the root itself), `path` the
    draft tokens from the root to it and `k` how many candidates are wanted
    (the best first)."""

    row: int
    node: int
    parent: int
    path: tuple[int, ...]
    k: int


class Sampled(list):
    """An expansion's candidates drawn independently from `dist` (a float [V]
    distribution), not proposed: `[(token, prob), ...]` plus the distribution."""

    def __init__(self, pairs: Sequence[tuple[int, float]], dist: Any) -> None:
        super().__init__(pairs)
        self.dist = dist


#: A drafter's batched expansion: per request, up to `k` (token, prob) pairs,
#: best first, or `Sampled` draws.
ExpandFn = Callable[[Sequence[Expansion]], list[list[tuple[int, float]]]]


def build_static(expand: ExpandFn, rows: int, width: int, depth: int | Sequence[int]
                 ) -> list[DraftTree]:
    """Static width x depth trees for `rows` contexts (`depth` may differ per row)."""
    depths = [depth] * rows if isinstance(depth, int) else list(depth)
    trees = [DraftTree() for _ in range(rows)]
    frontier = [(r, -1) for r in range(rows) if depths[r] > 0]
    level = 0
    while frontier:
        reqs = [Expansion(r, n, trees[r].parents[n] if n >= 0 else -2,
                          tuple(trees[r].path_tokens(n)), width if n < 0 else 1)
                for r, n in frontier]
        cands = expand(reqs)
        level += 1
        nxt = []
        for (r, n), cs in zip(frontier, cands):
            if isinstance(cs, Sampled) and cs:
                trees[r].dists[n] = cs.dist
            for tok, prob in cs[:width if n < 0 else 1]:
                child = trees[r].add(n, tok, prob)
                if level < depths[r]:
                    nxt.append((r, child))
        frontier = nxt
    return trees


def build_dynamic(expand: ExpandFn, rows: int, top_k: int, depth: int | Sequence[int],
                  budget: int) -> list[DraftTree]:
    """Confidence-expanded trees (EAGLE-2): see the module docstring."""
    depths = [depth] * rows if isinstance(depth, int) else list(depth)
    trees = [DraftTree() for _ in range(rows)]
    cum: list[list[float]] = [[] for _ in range(rows)]
    frontier = [(r, -1) for r in range(rows) if depths[r] > 0]
    level = 0
    while frontier:
        reqs = [Expansion(r, n, trees[r].parents[n] if n >= 0 else -2,
                          tuple(trees[r].path_tokens(n)), top_k) for r, n in frontier]
        cands = expand(reqs)
        level += 1
        new: dict[int, list[int]] = {}
        for (r, n), cs in zip(frontier, cands):
            base = cum[r][n] if n >= 0 else 1.0
            if isinstance(cs, Sampled) and cs:
                trees[r].dists[n] = cs.dist
            for tok, prob in cs[:top_k]:
                child = trees[r].add(n, tok, prob)
                cum[r].append(base * prob)
                new.setdefault(r, []).append(child)
        frontier = []
        for r, kids in new.items():
            if level >= depths[r]:
                continue
            best = sorted(kids, key=lambda i: -cum[r][i])[:top_k]
            frontier.extend((r, i) for i in sorted(best))
    out = []
    for r, t in enumerate(trees):
        if len(t) <= budget:
            out.append(t)
            continue
        # Highest cumulative probability first, ties to the shallower node:
        # ancestor-closed, since a child never beats its parent.
        order = sorted(range(len(t)), key=lambda i: (-cum[r][i], t.depth(i), i))
        out.append(t.keep(order[:budget]))
    return out


def build(expand: ExpandFn, rows: int, shape: TreeShape, depths: Sequence[int]
          ) -> list[DraftTree]:
    """Trees of `shape` for `rows` contexts, row r at most `depths[r]` deep."""
    depths = [min(d, shape.depth) for d in depths]
    if shape.kind == "static":
        return build_static(expand, rows, shape.width, depths)
    return build_dynamic(expand, rows, shape.top_k, depths, shape.budget)
