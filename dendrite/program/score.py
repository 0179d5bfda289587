"""Scorers: how `select`, `prune` and the search library rank states.

A scorer is anything callable as ``scorer(state) -> float``. Scorers that
need the model (`judge`) also implement ``score_all(states)`` so that the
scoring generations of all states run batched in the same engine steps.
Higher is better.
"""

from __future__ import annotations

import abc

import math
import re
from typing import Any, Callable, Sequence

from dendrite.program.state import State

_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


class Scorer(abc.ABC):
    """A named ``State -> float``; `score_all` scores many states at once."""

    name = "scorer"

    @abc.abstractmethod
    def __call__(self, state: State) -> float:
        """The state's score (higher is better)."""

    def score_all(self, states: Sequence[State]) -> list[float]:
        """Scores of ``states`` in order (waits for all of them first)."""
        _wait_all(states)
        return [_clean(self(s)) for s in states]

    def __repr__(self) -> str:
        return f"<scorer {self.name}>"


class FnScorer(Scorer):
    """A scorer from a plain function."""

    def __init__(self, fn: Callable[[State], float], name: str | None = None):
        self.fn = fn
        self.name = name or getattr(fn, "__name__", "fn")

    def __call__(self, state: State) -> float:
        return float(self.fn(state))


#: Mean logprob of the generated tokens on the state's path.
logprob = FnScorer(lambda s: s.logprob, "logprob")
#: Sum of generated-token logprobs on the path.
sum_logprob = FnScorer(lambda s: s.sum_logprob, "sum_logprob")


def length_penalty(alpha: float = 1.0, base: float = 5.0) -> Scorer:
    """GNMT length-normalised logprob: ``sum_logprob / ((base + n) / (base + 1)) ** alpha``.

    ``alpha=0`` is the plain sum; ``alpha=1`` is close to the mean.
    """

    def f(s: State) -> float:
        return s.sum_logprob / (((base + s.num_gen_tokens) / (base + 1.0)) ** alpha)

    return FnScorer(f, f"length_penalty({alpha})")


def capture(name: str, cast: Callable[[Any], float] = float, default: float = -math.inf) -> Scorer:
    """Score by a captured value, e.g. ``capture("rating")``; ``default`` if it does not parse."""

    def f(s: State) -> float:
        try:
            return float(cast(s[name]))
        except (KeyError, TypeError, ValueError):
            return default

    return FnScorer(f, f"capture({name!r})")


def parse_number(text: Any, default: float = -math.inf) -> float:
    """The first number in ``text`` as a float, or ``default``."""
    m = _NUMBER.search(str(text))
    return float(m.group()) if m else default


class Judge(Scorer):
    """Score each state by a generation on a scoring prompt.

    For every state, a child is forked (``context="state"``, the default:
    the judge sees the branch) or a fresh sequence is started
    (``context="fresh"``); ``template`` is formatted with the state's
    captures plus ``text`` and appended; a short constrained generation is
    parsed into a number. All judges of one `score_all` run batched.
    ``template`` may also be a callable ``State -> str``.
    """

    def __init__(
        self,
        template: "str | Callable[[State], str]",
        *,
        regex: str | None = r"(10|[0-9])",
        max_tokens: int = 4,
        temperature: float = 0.0,
        parse: Callable[[str], float] = parse_number,
        context: str = "state",
        label: str = "judge",
    ):
        if context not in ("state", "fresh"):
            raise ValueError("context must be 'state' or 'fresh'")
        self.template = template
        self.regex = regex
        self.max_tokens = max_tokens
        self.temperature = temperature
        self.parse = parse
        self.context = context
        self.label = label
        self.name = f"judge({template[:24]!r})" if isinstance(template, str) else "judge"

    def _prompt(self, s: State) -> str:
        if callable(self.template):
            return str(self.template(s))
        values = dict(s._captures)
        values.setdefault("text", s._text)
        return self.template.format_map(values)

    def score_all(self, states: Sequence[State]) -> list[float]:
        """Ask the model to judge each state; one score per state."""
        _wait_all(states)
        judges = []
        for s in states:
            if self.context == "state":
                j = s.fork(1, label=self.label)[0]
            else:
                j = s.runtime.new_root(s.seed, path=f"{s.node.path}.judge")
                j.node.label = self.label
            j += self._prompt(s)
            opts: dict[str, Any] = {"max_tokens": self.max_tokens, "temperature": self.temperature}
            if self.regex:
                opts["regex"] = self.regex
            j.gen("judgement", **opts)
            judges.append(j)
        _wait_all(judges)
        out = []
        for s, j in zip(states, judges):
            v = _clean(self.parse(j["judgement"]))
            j.node.score = v
            j.release()
            out.append(v)
        return out

    def __call__(self, state: State) -> float:
        return self.score_all([state])[0]


def judge(template: "str | Callable[[State], str]", **options: Any) -> Judge:
    """A model-judged scorer: ``judge("Rate the answer 0-10: ")``; see `Judge`."""
    return Judge(template, **options)


def as_scorer(by: Any) -> Scorer:
    """Normalise ``by=``: None (logprob), a Scorer, a callable, or a name.

    A name is a built-in scorer ("logprob", "sum_logprob") or a capture.
    """
    if by is None:
        return logprob
    if isinstance(by, Scorer):
        return by
    if isinstance(by, str):
        if by == "logprob":
            return logprob
        if by == "sum_logprob":
            return sum_logprob
        return capture(by)
    if callable(by):
        return FnScorer(by)
    raise TypeError(f"cannot score by {by!r}: give a scorer, a callable or a capture name")


def _wait_all(states: Sequence[State]) -> None:
    if states:
        rt = states[0].runtime
        rt.wait(lambda: all(s.done for s in states))


def _clean(v: Any) -> float:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return -math.inf
    return -math.inf if math.isnan(f) else f
