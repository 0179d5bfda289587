"""Tree-of-Thought search: BFS keeping the top-k, and DFS with backtracking."""

from __future__ import annotations

import math
from typing import Any, Callable

from dendrite.program import program, prune
from dendrite.program.state import State
from dendrite.search.common import CachedScorer, as_batch_step, expand, mark_path


@program
def tot_bfs(
    s: State,
    prompt: str = "",
    width: int = 3,
    keep: int = 2,
    depth: int = 3,
    step: Any = None,
    by: Any = None,
    label: str = "thought",
) -> State:
    """Breadth-first ToT: each level expands every kept state into ``width``
    thoughts (all batched) and keeps the ``keep`` best by ``by`` across the level.

    Returns the best state of the last level.
    """
    if prompt:
        s += prompt
    scorer = CachedScorer(by)
    run_step = as_batch_step(step)
    frontier = [s]
    for _ in range(int(depth)):
        kids = [k for g in expand(frontier, width, run_step, label) for k in g]
        frontier = list(prune(kids, keep=keep, by=scorer))
        if not frontier:
            break
    best = frontier[0]
    mark_path(best)
    return best


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
