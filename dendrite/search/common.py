"""Shared pieces of the search programs: steps, expansion, score caching."""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Sequence

from dendrite.program.score import Scorer, as_scorer
from dendrite.program.state import State

#: A step queues one reasoning step on a state (it must not wait).
Step = Callable[[State], None]
#: A batched step queues one step on every state of a list.
BatchStep = Callable[[list[State]], None]


def default_step(
    name: str = "step", max_tokens: int = 48, stop: str | list[str] | None = "\n", temperature: float = 1.0, **options: Any
) -> Step:
    """The default step: one generation up to ``stop`` (a line of reasoning)."""

    def step(s: State) -> None:
        s.gen(name, max_tokens=max_tokens, stop=stop, temperature=temperature, **options)

    step.__name__ = f"gen_{name}"
    return step


def as_batch_step(step: Step | BatchStep | dict | None) -> BatchStep:
    """Normalise ``step``: None (default), gen options (a dict), a per-state or batched callable.

    A callable with ``step.batched = True`` takes the whole list of states.
    """
    if step is None:
        step = default_step()
    elif isinstance(step, dict):
        opts = dict(step)
        step = default_step(**opts)
    if getattr(step, "batched", False):
        return step  # type: ignore[return-value]

    def batched(states: list[State]) -> None:
        for s in states:
            step(s)  # type: ignore[misc]

    return batched


def expand(states: Sequence[State], width: int, step: BatchStep, label: str | None) -> list[list[State]]:
    """Fork every state ``width`` times and queue one step on all children.

    The parents are released (their children keep the shared KV). Nothing
    waits here: the children's generations run batched when read.
    """
    groups = [list(s.fork(width, label=label)) for s in states]
    for s in states:
        s.release()
    step([k for g in groups for k in g])
    return groups


class CachedScorer(Scorer):
    """Scores each state once (model judges are not re-run on re-ranking)."""

    def __init__(self, by: Any):
        self.inner = as_scorer(by)
        self.name = self.inner.name
        self.cache: dict[int, float] = {}

    def score_all(self, states: Sequence[State]) -> list[float]:
        """Scores of `states`, each computed once and cached by state id."""
        todo = [s for s in states if s.id not in self.cache]
        if todo:
            for s, v in zip(todo, self.inner.score_all(todo)):
                self.cache[s.id] = v
        return [self.cache[s.id] for s in states]

    def __call__(self, state: State) -> float:
        return self.score_all([state])[0]


def wait_all(states: Iterable[State]) -> None:
    """One batched flush until every state is done."""
    states = list(states)
    if states:
        states[0].runtime.wait(lambda: all(s.done for s in states))


def finite(x: float, default: float = -1e9) -> float:
    """`x`, or `default` when it is NaN or infinite (so sorting never sees NaN)."""
    return x if math.isfinite(x) else default


def mark_path(state: State) -> None:
    """Mark ``state`` and its ancestors selected in the tree record."""
    s: State | None = state
    while s is not None:
        s.node.selected = True
        s = s.parent
