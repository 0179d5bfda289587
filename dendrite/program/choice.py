"""`select(name, choices=[...])` ranked by logprob: score every choice, keep the best.

SGLang's ``select``: each choice's tokens are appended to the state and scored
by the model; the best choice is captured. All choices are scored in one
batched engine step: the state's sequence forks once per choice, each child
gets its choice's tokens (`Engine.submit_score`), and the single forward
over every child yields the logits at all their positions. The winning child
becomes the state's sequence (its KV is kept); the others are released.

``method`` ranks by the ``"mean"`` token logprob (SGLang's default,
``token_length_normalized``) or the ``"sum"``; ``"constrained"`` is the
other mode, a generation constrained to one of the choices (see `select`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any

from dendrite.program.state import Appendable, State, _needs_prefill, _Op

#: Ranked methods (``"constrained"`` is handled by `select` as a gen).
RANK_METHODS: tuple[str, ...] = ("mean", "sum")
#: Every ``method=`` `select` accepts, with SGLang's name for "mean".
METHODS: tuple[str, ...] = RANK_METHODS + ("constrained", "token_length_normalized")


def check_method(method: Any) -> str:
    """``method`` normalised ("token_length_normalized" -> "mean"), or a ValueError."""
    if method == "token_length_normalized":
        return "mean"
    if method not in ("mean", "sum", "constrained"):
        raise ValueError(f"select: method must be one of {', '.join(map(repr, METHODS))}, "
                         f"got {method!r}")
    return method


def check_choices(choices: Any) -> list[str]:
    """A non-empty list of non-empty strings, or a TypeError/ValueError naming the bad one."""
    if isinstance(choices, str) or not isinstance(choices, (list, tuple)):
        raise TypeError(f"select: choices must be a list of strings, got {choices!r}")
    if not choices:
        raise ValueError("select: choices is empty: give at least one")
    for i, c in enumerate(choices):
        if not isinstance(c, str):
            raise TypeError(f"select: choice {i} must be a string, got {type(c).__name__}")
        if not c:
            raise ValueError(f"select: choice {i} is empty: it has no tokens to score")
    return list(choices)


class ChoiceExpr(Appendable):
    """``s += select("x", choices=[...])`` in a ranked method."""

    __slots__ = ("choices", "method", "name")

    def __init__(self, name: str, choices: Sequence[str], method: str):
        if not isinstance(name, str) or not name:
            raise TypeError("select needs a capture name (a non-empty string)")
        self.name = name
        self.choices = check_choices(choices)
        self.method = method

    def append_to(self, state: State) -> None:
        """Queue the scoring of every choice on ``state``."""
        state._push(_ChoiceOp(self))

    def __repr__(self) -> str:
        return f"select({self.name!r}, choices={self.choices!r}, method={self.method!r})"


class _Scoring:
    """The `submit_score` handles of one select, one per choice, as one in-flight item."""

    def __init__(self, seqs: list[Any], handles: list[Any]):
        self.seqs, self.handles = seqs, handles

    @property
    def done(self) -> bool:
        return all(h.done for h in self.handles)

    @property
    def error(self) -> BaseException | None:
        return next((h.error for h in self.handles if h.error is not None), None)

    def abandon(self) -> None:
        """Release every child (aborting what still runs): the error path."""
        for s in self.seqs:
            s.release()


class _ChoiceOp(_Op):
    needs_seq = True

    def __init__(self, expr: ChoiceExpr):
        self.expr = expr

    def describe(self) -> str:
        return f"select {self.expr.name!r}"

    def start(self, state: State, rt: Any) -> bool:
        if _needs_prefill(state._seq):
            # Prefill the prompt in the next batched step rather than once per child.
            rt._awaiting_prefill.add(state.node.id)
            return False
        engine = rt.engine
        ids = [engine.tokenizer.encode(c, add_special_tokens=False) for c in self.expr.choices]
        for c, tok in zip(self.expr.choices, ids):
            if not tok:
                raise ValueError(f"select: choice {c!r} encodes to no tokens")
        kids = state._seq.fork(len(ids))
        try:
            handles = [engine.submit_score(k, t) for k, t in zip(kids, ids)]
        except BaseException:
            for k in kids:
                k.release()
            raise
        group = _Scoring(kids, handles)
        state._inflight = group
        rt._inflight[id(group)] = (group, state, self, time.perf_counter())
        return False

    def complete(self, state: State, group: _Scoring, seconds: float) -> None:
        """Rank the scored choices, keep the winner's branch, record the capture."""
        err = group.error
        if err is not None:
            group.abandon()
            raise err
        tokens = [h.result.logprobs for h in group.handles]
        sums = [math.fsum(lps) for lps in tokens]
        means = [s / len(lps) for s, lps in zip(sums, tokens)]
        scores = means if self.expr.method == "mean" else sums
        best = max(range(len(scores)), key=lambda i: (scores[i], -i))  # ties: the first
        old = state._seq
        state._seq = group.seqs[best]
        for i, k in enumerate(group.seqs):
            if i != best:
                k.release()
        old.release()  # (its KV lives on in the winner, which shares it)
        choice = self.expr.choices[best]
        name = self.expr.name
        n, lp = len(tokens[best]), sums[best]
        state._text += choice
        state._captures[name] = choice
        state._meta[name] = {
            "method": self.expr.method, "choices": list(self.expr.choices),
            "scores": list(scores), "sum_logprobs": sums, "mean_logprobs": means,
            "token_logprobs": [list(t) for t in tokens], "index": best,
        }
        state._lp_sum += lp
        state._lp_tokens += n
        state._finish_reason = "select"
        node = state.node
        node.captures[name] = choice
        node.gen_tokens += n
        node.gen_seconds += seconds
        from dendrite.program.tree import Segment

        node.segments.append(Segment("gen", choice, name, n, lp, seconds, "select"))
