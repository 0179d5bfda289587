"""The search library, each algorithm a short `@program` (`dendrite.program.program`).

Every search takes a state ``s`` (call it inline: ``best = tot_bfs(s, ...)``)
or runs standalone (``tot_bfs.run(engine, prompt="...")``), a ``step``
(what one expansion generates: None for one line of text, a dict of gen
options, or a callable ``State -> None`` that only queues ops) and ``by``
(a scorer or value: ``dendrite.score.logprob`` by default, any callable, or
``dendrite.score.judge(...)`` to let the model judge). All branches of one
expansion generate in the same batched engine steps.

* `best_of_n`       sample n, keep the best.
* `self_consistency` sample n reasoning paths, majority vote on the answer.
* `beam_search`     width, depth, GNMT length penalty, finished beams kept.
* `tot_bfs`         Tree-of-Thought BFS keeping the top-k (or all) per level,
                    per-level steps and prompts (chat turns).
* `tot_frontier`    the same BFS returning the whole last level (for votes).
* `tot_dfs`         Tree-of-Thought DFS with threshold pruning and backtracking.
* `mcts`            UCT / PUCT, expansion width, rollouts, backpropagation,
                    value from a callable or the model.

`ALGORITHMS` maps the names a ``.dendrite`` ``search`` statement uses to the
state-returning searches.
"""

from __future__ import annotations

from dendrite.search.beam import beam_search
from dendrite.search.best_of import best_of_n
from dendrite.search.common import as_batch_step, default_step, expand
from dendrite.search.mcts import mcts
from dendrite.search.self_consistency import self_consistency
from dendrite.search.tot import tot_bfs, tot_dfs, tot_frontier

#: Names usable in ``search NAME(...)`` statements of .dendrite scripts.
ALGORITHMS = {
    "mcts": mcts,
    "beam": beam_search,
    "bfs": tot_bfs,
    "dfs": tot_dfs,
    "best_of": best_of_n,
}

__all__ = [
    "ALGORITHMS",
    "as_batch_step",
    "beam_search",
    "best_of_n",
    "default_step",
    "expand",
    "mcts",
    "self_consistency",
    "tot_bfs",
    "tot_dfs",
    "tot_frontier",
]
