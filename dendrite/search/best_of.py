"""Best-of-n: sample n continuations, keep the best one."""

from __future__ import annotations

from typing import Any

from dendrite.program import program, select
from dendrite.program.state import State
from dendrite.search.common import as_batch_step


@program
def best_of_n(s: State, prompt: str = "", n: int = 4, step: Any = None, by: Any = None, label: str = "sample") -> State:
    """Fork ``n`` samples of ``step`` (batched) and return the best by ``by`` (mean logprob)."""
    if prompt:
        s += prompt
    kids = list(s.fork(n, label=label))
    s.release()
    as_batch_step(step)(kids)
    return select(kids, by=by)
