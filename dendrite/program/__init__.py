"""The Python DSL: programs over lazily-run, batched states.

    import dendrite
    from dendrite.program import program

    @program
    def best_of(s, question: str, n: int = 4):
        s += f"Question: {question}\\nAnswer:"
        kids = s.fork(n)
        for k in kids:
            k.gen("answer", max_tokens=64, stop="\\n", temperature=0.8)
        best = dendrite.select(kids, by=dendrite.score.logprob)
        return best["answer"]

    result = best_of.run(engine, question="...", seed=0)

Public API: `program` (the decorator, a plain function) / `Program` / `ProgramResult`, `State` (``s += text``,
``s.gen``, ``s.fork``, ``s[name]``, ``s.text``, ``s.logprob``, ``s.score``,
``s.release``, ``s.user``/``s.system``/``s.assistant`` chat turns,
``s.var_scope``), `gen` (SGLang's ``s += gen(...)``; `gen_int`, `gen_string`),
`system`/`user`/`assistant` (``s += user("hi")``), `select`, `prune`,
`score` (logprob, sum_logprob, length_penalty, capture, judge), `Runtime`,
and `Tree` (``.dendrite`` scripts: `dendrite.dsl`, a layer above). Limits: `MAX_FORK`
children per fork, `MAX_DEPTH` forks deep, ``run(max_branches=)`` live
branches (default `MAX_BRANCHES`) and ``run(max_steps=)`` engine steps
(default `DEFAULT_MAX_STEPS`, past it `StepBudgetExceeded`).
"""

from __future__ import annotations

from dendrite.program import score
from dendrite.program.options import GEN_OPTIONS, GenOptionError
from dendrite.program.program import Param, Program, ProgramResult, program
from dendrite.program.runtime import (
    DEFAULT_MAX_STEPS,
    MAX_BRANCHES,
    Runtime,
    StepBudgetExceeded,
)
from dendrite.program.select import prune, select
from dendrite.program.state import (
    MAX_DEPTH,
    MAX_FORK,
    Expr,
    GenExpr,
    State,
    StateGroup,
    StateReleasedError,
    assistant,
    gen,
    gen_int,
    gen_string,
    system,
    user,
)
from dendrite.program.tree import Node, Segment, Tree

__all__ = [
    "DEFAULT_MAX_STEPS",
    "GEN_OPTIONS",
    "MAX_BRANCHES",
    "MAX_DEPTH",
    "MAX_FORK",
    "Expr",
    "GenExpr",
    "GenOptionError",
    "Node",
    "Param",
    "Program",
    "ProgramResult",
    "Runtime",
    "Segment",
    "State",
    "StateGroup",
    "StateReleasedError",
    "StepBudgetExceeded",
    "Tree",
    "assistant",
    "gen",
    "gen_int",
    "gen_string",
    "program",
    "prune",
    "score",
    "select",
    "system",
    "user",
]
