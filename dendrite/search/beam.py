"""Beam search over steps (chunks of tokens), with a length penalty.

Each round every live beam forks ``width`` candidates that each sample one
step; candidates (and beams that already finished) compete for ``width``
places by length-normalised logprob. All candidates of a round generate in
the same batched engine steps.
"""

from __future__ import annotations

from typing import Any, Callable

from dendrite.program import program, prune, score
from dendrite.program.state import State
from dendrite.search.common import CachedScorer, as_batch_step, default_step, expand, mark_path, wait_all


def _finished(s: State) -> bool:
    return s.finish_reason == "eos"


@program
def beam_search(
    s: State,
    prompt: str = "",
    width: int = 3,
    depth: int = 4,
    step: Any = None,
    length_penalty: float = 1.0,
    by: Any = None,
    done: Callable[[State], bool] | None = None,
    dedupe: bool = True,
    label: str = "beam",
) -> State:
    """Keep the ``width`` best of all candidates each round, for ``depth`` rounds.

    ``by`` defaults to ``score.length_penalty(length_penalty)`` (GNMT);
    ``done(state)`` says a beam is finished (default: it generated EOS);
    ``dedupe`` drops candidates whose text duplicates another's.
    Returns the best beam.
    """
    if prompt:
        s += prompt
    scorer = CachedScorer(by if by is not None else score.length_penalty(length_penalty))
    is_done = done or _finished
    run_step = as_batch_step(step or default_step(max_tokens=16, stop=None))
    beams, finished = [s], []
    for _ in range(int(depth)):
        kids = [k for g in expand(beams, width, run_step, label) for k in g]
        wait_all(kids)
        if dedupe:
            seen: dict[str, State] = {}
            unique = []
            for k in kids:
                if k.text in seen:
                    k.node.pruned = True
                    k.node.info["duplicate_of"] = seen[k.text].id
                    k.release()
                else:
                    seen[k.text] = k
                    unique.append(k)
            kids = unique
        pool = list(prune(kids + finished, keep=width, by=scorer))
        finished = [b for b in pool if is_done(b)]
        beams = [b for b in pool if not is_done(b)]
        if not beams:
            break
    ranked = list(prune(beams + finished, keep=1, by=scorer))
    best = ranked[0]
    mark_path(best)
    return best
