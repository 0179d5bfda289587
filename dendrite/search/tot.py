"""Tree-of-Thought search: BFS keeping the top-k (or every thought), and DFS with backtracking."""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

from dendrite.program import program, prune
from dendrite.program.state import State, StateGroup
from dendrite.search.common import BatchStep, CachedScorer, as_batch_step, expand, mark_path


def _per_level(value: Any, depth: int, name: str) -> list[Any]:
    """One entry per level: a list/tuple must have ``depth`` entries, anything else repeats."""
    if isinstance(value, (list, tuple)):
        if len(value) != depth:
            raise ValueError(f"{name} has {len(value)} entries but depth is {depth}: give one per level")
        return list(value)
    return [value] * depth


def _bfs(
    s: State,
    prompt: str,
    width: int,
    keep: int | None,
    depth: int,
    step: Any,
    scorer: CachedScorer,
    label: str,
    level_prompts: str | Sequence[str | None] | None,
) -> list[State]:
    """The BFS levels shared by `tot_bfs` and `tot_frontier`; returns the last level.

    With ``keep=None`` nothing is scored and nothing waits: every level is
    only queued, so a branch starts its next level as soon as its own step
    is done (no barrier at the slowest sibling), as independent forks would.
    """
    depth = int(depth)
    if depth < 0:
        raise ValueError(f"depth must be >= 0, got {depth}")
    if keep is not None and int(keep) < 1:
        raise ValueError(f"keep must be >= 1 or None (keep every thought), got {keep}")
    steps: list[BatchStep] = [as_batch_step(st) for st in _per_level(step, depth, "step")]
    texts = _per_level(level_prompts, depth, "level_prompts")  # one text: the same each level
    if prompt:
        s += prompt
    frontier = [s]
    for level in range(depth):
        if texts[level]:
            # Before the fork, so the children share its KV instead of each prefilling it.
            for st in frontier:
                st += str(texts[level])
        kids = [k for g in expand(frontier, width, steps[level], label) for k in g]
        frontier = kids if keep is None else list(prune(kids, keep=keep, by=scorer))
        if not frontier:
            break
    return frontier


@program
def tot_bfs(
    s: State,
    prompt: str = "",
    width: int = 3,
    keep: int | None = 2,
    depth: int = 3,
    step: Any = None,
    by: Any = None,
    label: str = "thought",
    level_prompts: str | Sequence[str | None] | None = None,
) -> State:
    """Breadth-first ToT: each level expands every kept state into ``width``
    thoughts (all batched) and keeps the ``keep`` best by ``by`` across the level.

    ``keep=None`` keeps every thought (no scoring until the last level).
    ``step`` may be a list with one step per level; ``level_prompts`` (a list
    with one text or None per level, or one text for every level) is appended
    to every state of a level before it forks, e.g. the next chat turn, so its
    children share that text's KV.
    Returns the best state of the last level.
    """
    scorer = CachedScorer(by)
    frontier = _bfs(s, prompt, width, keep, depth, step, scorer, label, level_prompts)
    if keep is None and len(frontier) > 1:
        frontier = list(prune(frontier, keep=1, by=scorer))
    best = frontier[0]
    mark_path(best)
    return best


@program
def tot_frontier(
    s: State,
    prompt: str = "",
    width: int = 3,
    keep: int | None = None,
    depth: int = 3,
    step: Any = None,
    by: Any = None,
    label: str = "thought",
    level_prompts: str | Sequence[str | None] | None = None,
) -> StateGroup:
    """`tot_bfs` that returns the whole last level instead of its best state:
    for voting over the leaves (SGLang's tree-of-thought benchmarks).

    By default every thought is kept (``keep=None``: ``width ** depth``
    leaves, in tree order, none waited for); with ``keep=k`` the ``k`` best
    by ``by``, best first. The leaves stay live (read them, then release).
    """
    scorer = CachedScorer(by)
    frontier = _bfs(s, prompt, width, keep, depth, step, scorer, label, level_prompts)
    return StateGroup(frontier)


@program
def tot_dfs(
    s: State,
    prompt: str = "",
    width: int = 2,
    depth: int = 3,
    step: Any = None,
    by: Any = None,
    threshold: float | None = None,
    goal: Callable[[State], bool] | None = None,
    max_expansions: int = 16,
    label: str = "thought",
) -> State:
    """Depth-first ToT with backtracking.

    A state is expanded into ``width`` thoughts (batched), tried best-first;
    thoughts scoring below ``threshold`` are pruned; at ``depth`` a state is
    a solution if ``goal(state)`` holds (default: always). A failed subtree is
    abandoned and the next sibling tried. At most ``max_expansions`` states
    are expanded; if no solution is found, the best deepest state is returned.
    """
    if prompt:
        s += prompt
    scorer = CachedScorer(by)
    run_step = as_batch_step(step)
    expansions = 0
    best: tuple[int, float, int] | None = None  # (depth, score, -id)
    best_state: State | None = None

    def consider(st: State, d: int) -> None:
        nonlocal best, best_state
        key = (d, st.score if st.score is not None else -math.inf, -st.id)
        if best is None or key > best:
            best, best_state = key, st

    def dfs(st: State, d: int) -> State | None:
        nonlocal expansions
        consider(st, d)
        if d >= depth:
            return st if goal is None or goal(st) else None
        if expansions >= max_expansions:
            return None
        expansions += 1
        kids = expand([st], width, run_step, label)[0]
        ranked = list(prune(kids, keep=len(kids), by=scorer, release=False))
        for i, k in enumerate(ranked):
            if threshold is not None and (k.score is None or k.score < threshold):
                for rest in ranked[i:]:
                    rest.node.pruned = True
                    rest.release()
                break
            found = dfs(k, d + 1)
            if found is not None:
                for rest in ranked[i + 1 :]:
                    rest.release()
                return found
            k.node.pruned = True  # backtrack
            k.node.info["backtracked"] = True
            k.release()
        return None

    result = dfs(s, 0) or best_state or s
    result.node.pruned = False
    mark_path(result)
    return result
