"""The Python DSL: programs over lazily-run, batched states.

    import dendrite

    @dendrite.program
    def best_of(s, question: str, n: int = 4):
        s += f"Question: {question}\\nAnswer:"
        kids = s.fork(n)
        for k in kids:
            k.gen("answer", max_tokens=64, stop="\\n", temperature=0.8)
        best = dendrite.select(kids, by=dendrite.score.logprob)
        return best["answer"]

    result = best_of.run(engine, question="...", seed=0)

Public API: `program` / `Program` / `ProgramResult`, `State` (``s += text``,
``s.gen``, ``s.fork``, ``s[name]``, ``s.text``, ``s.logprob``, ``s.score``,
``s.release``), `gen` (SGLang's ``s += gen(...)``), `select`, `prune`,
`score` (logprob, sum_logprob, length_penalty, capture, judge), `Runtime`,
`Tree`, and `load_script` for ``.dendrite`` files. Limits: `MAX_FORK`
children per fork, `MAX_DEPTH` forks deep, ``run(max_branches=)`` live
branches (default `MAX_BRANCHES`) and ``run(max_steps=)`` engine steps
(default `DEFAULT_MAX_STEPS`, past it `StepBudgetExceeded`).
"""

from __future__ import annotations

import sys as _sys
import types as _types

from dendrite.program import score
from dendrite.program.options import GEN_OPTIONS, GenOptionError
from dendrite.program.program import Param, Program, ProgramResult, program
from dendrite.program.runtime import DEFAULT_MAX_STEPS, MAX_BRANCHES, Runtime, StepBudgetExceeded
from dendrite.program.select import prune, select
from dendrite.program.state import (
    MAX_DEPTH,
    MAX_FORK,
    GenExpr,
    State,
    StateGroup,
    StateReleasedError,
    gen,
)
from dendrite.program.tree import Node, Segment, Tree


def dsl_module():
    """The script-language package: ``dendrite.dsl`` when installed, else the
    source checkout's top-level ``dsl/`` (always the same one per process)."""
    try:
        from dendrite import dsl
    except ImportError:
        import dsl
    return dsl


def load_script(path: str, name: str | None = None) -> Program:
    """Compile a ``.dendrite`` file into a `Program` (its first, or ``name``d, program)."""
    return dsl_module().load(path, name=name)


__all__ = [
    "DEFAULT_MAX_STEPS",
    "GEN_OPTIONS",
    "GenExpr",
    "GenOptionError",
    "MAX_BRANCHES",
    "MAX_DEPTH",
    "MAX_FORK",
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
    "gen",
    "dsl_module",
    "load_script",
    "program",
    "prune",
    "score",
    "select",
]


_decorator = program


class _CallableModule(_types.ModuleType):
    """This package is itself the decorator: ``@dendrite.program`` works whether
    ``dendrite.program`` names the package or was imported from it."""

    def __call__(self, fn=None, *, name=None):
        return _decorator(fn, name=name)


_sys.modules[__name__].__class__ = _CallableModule
# ``from dendrite.program import program`` and ``import dendrite.program as dp``
# must both give this (callable) package, so ``dp.State``, ``dp.select`` etc.
# work either way: the name ``program`` is the package itself.
program = _sys.modules[__name__]
