"""Self-consistency: sample n reasoning paths and take the majority answer."""

from __future__ import annotations

from collections import Counter
from typing import Any, Callable

from dendrite.program import program
from dendrite.program.state import State
from dendrite.search.common import as_batch_step, default_step, wait_all
from dendrite.program.answers import number, vote


def _extractor(answer: str | Callable[[State], Any] | None, prefix_len: Callable[[State], int]):
    if callable(answer):
        return answer
    name = answer or "answer"

    def extract(k: State) -> Any:
        caps = k.captures
        if name in caps:
            v = caps[name]
            n = number(v)
            return n if n is not None else str(v).strip()
        return number(k.text[prefix_len(k):])

    return extract


@program
def self_consistency(
    s: State,
    prompt: str = "",
    n: int = 5,
    step: Any = None,
    answer: str | Callable[[State], Any] | None = None,
    label: str = "sample",
) -> Any:
    """Majority vote over ``n`` sampled paths.

    ``answer`` is a capture name (its last number, else its text) or a
    callable ``State -> value``; by default the capture "answer" or the last
    number each path generated. Sets ``s["answer"]`` and ``s["votes"]``
    (answer -> count) and returns the winning answer.
    """
    if prompt:
        s += prompt
    base = len(s.text)
    kids = list(s.fork(n, label=label))
    as_batch_step(step or default_step(max_tokens=96, stop=None))(kids)
    wait_all(kids)
    extract = _extractor(answer, lambda k: base)
    answers = [extract(k) for k in kids]
    winner = vote(answers)
    counts = Counter(repr(a) for a in answers if a is not None)
    for k, a in zip(kids, answers):
        k.node.info["answer"] = a
        if a is not None and a == winner:
            k.node.selected = True
        else:
            k.node.pruned = True
        k.release()
    s["answer"] = winner
    s["votes"] = {a: c for a, c in counts.most_common()}
    s.node.info["votes"] = dict(counts)
    return winner
