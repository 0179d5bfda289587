"""`select` and `prune`: rank states by a scorer, keep the best.

Both wait for all given states (one batched flush), score them (batched for
model judges), record the scores on the tree, mark the losers pruned and, by
default, release their engine sequences (their captures stay readable).

``select(name, choices=[...])`` is SGLang's choice instead: every choice is
scored by the model and the best one appended (`dendrite.program.choice`).
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence

from dendrite.program.choice import ChoiceExpr, check_choices, check_method
from dendrite.program.score import as_scorer
from dendrite.program.state import GenExpr, State, StateGroup
from dendrite.program.options import make_spec


def _rank(states: Sequence[State], by: Any) -> list[int]:
    scores = as_scorer(by).score_all(states)
    for s, v in zip(states, scores):
        s.score = v
    # Best first; ties keep the original order (deterministic).
    return sorted(range(len(states)), key=lambda i: (-scores[i], i))


def _drop(state: State, release: bool) -> None:
    state.node.pruned = True
    if release:
        state.release()


def select(
    states: "Iterable[State] | str",
    by: Any = None,
    *,
    release: bool = True,
    choices: Sequence[str] | None = None,
    method: str = "mean",
    **gen_options: Any,
) -> "State | GenExpr | ChoiceExpr":
    """Return the best of ``states`` by ``by`` (default: mean logprob).

    The others are marked pruned and released (``release=False`` keeps them).

    SGLang form: ``s += dendrite.select("name", choices=[...])`` appends the
    choice the model ranks best and captures it as ``s["name"]``. Every
    choice's tokens are scored after the state's text, all in one batched
    engine step; ``method`` ranks by their ``"mean"`` logprob (the default,
    SGLang's ``token_length_normalized``, also accepted by that name) or
    their ``"sum"``; ``s.meta_info("name")`` has every choice's scores.
    ``method="constrained"`` instead generates under a grammar allowing
    exactly the choices (sampled: ``gen_options`` such as ``temperature``
    apply), as ``s.gen("name", choices=[...])``.
    """
    if isinstance(states, str):
        if choices is None and isinstance(by, (list, tuple)):
            choices, by = by, None  # SGLang's positional select("x", ["a", "b"])
        if choices is None:
            raise TypeError("select(name, choices=[...]) needs choices")
        method = check_method(method)
        if method == "constrained":
            return GenExpr(make_spec(states, {**gen_options, "choices": list(check_choices(choices))}))
        if gen_options:
            raise TypeError(f"select(name, choices=..., method={method!r}) scores the choices "
                            f"and samples nothing: it takes no gen options "
                            f"(got {', '.join(sorted(gen_options))}; use method='constrained')")
        return ChoiceExpr(states, choices, method)
    if gen_options or choices is not None or method != "mean":
        raise TypeError("select(states, by=...) takes no gen options, choices or method")
    states = list(states)
    if not states:
        raise ValueError("select() of no states")
    order = _rank(states, by)
    best = states[order[0]]
    best.node.selected = True
    for i in order[1:]:
        _drop(states[i], release)
    return best


def prune(states: Iterable[State], keep: int, by: Any = None, *, release: bool = True) -> StateGroup:
    """Keep the ``keep`` best of ``states`` (best first); prune and release the rest."""
    states = list(states)
    keep = max(0, int(keep))
    if not states:
        return StateGroup()
    order = _rank(states, by)
    for i in order[keep:]:
        _drop(states[i], release)
    return StateGroup(states[i] for i in order[:keep])
