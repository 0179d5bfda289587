"""Dendrite: an LLM inference engine for agents that think in trees.

The KV state of a sequence is a node in a tree: `fork` costs O(1), children
share their parent's paged KV blocks by reference count and copy a page only
when they write into a shared one. Search programs (fork, gen, select, prune,
score) run every live branch in batched engine steps.

    import dendrite
    engine = dendrite.Engine("path/to/hf-model-dir")
    s = engine.new_sequence("Once upon a time")
    kids = s.fork(4)
    results = engine.generate(kids, dendrite.SamplingParams(temperature=0.8, max_tokens=32))

Heavy modules (torch, the model) load on first use of the name that needs them.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # what the lazy names are, for type checkers and IDEs
    from dendrite import dsl, program, search
    from dendrite.dsl import load_script
    from dendrite.engine import Engine, GenResult, LeafTooLarge, Sequence
    from dendrite.grammar import Constraint, GrammarError
    from dendrite.kv import BlockPool, KVTree, OutOfPages, RadixCache, Scheduler, check_invariants
    from dendrite.program import Program, State, gen, prune, score, select
    from dendrite.sampling import SamplingParams

#: Public name -> the module that defines it; a name equal to its module's last
#: part is that module itself. Nothing loads until a name is first used, so
#: ``import dendrite`` (and ``dendrite --help``) imports neither torch nor the
#: native core.
_LAZY = {
    "BlockPool": "dendrite.kv",
    "KVTree": "dendrite.kv",
    "OutOfPages": "dendrite.kv",
    "RadixCache": "dendrite.kv",
    "Scheduler": "dendrite.kv",
    "check_invariants": "dendrite.kv",
    "Engine": "dendrite.engine",
    "Sequence": "dendrite.engine",
    "GenResult": "dendrite.engine",
    "LeafTooLarge": "dendrite.engine",
    "SamplingParams": "dendrite.sampling",
    "Constraint": "dendrite.grammar",
    "GrammarError": "dendrite.grammar",
    "program": "dendrite.program",
    "Program": "dendrite.program",
    "State": "dendrite.program",
    "gen": "dendrite.program",
    "select": "dendrite.program",
    "prune": "dendrite.program",
    "score": "dendrite.program",
    "search": "dendrite.search",
    "dsl": "dendrite.dsl",
    "load_script": "dendrite.dsl",
}

__all__ = list(_LAZY)
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    module_name = _LAZY.get(name)
    if module_name is None:
        raise AttributeError(f"module 'dendrite' has no attribute {name!r}")
    module = importlib.import_module(module_name)
    value = module if module_name.rpartition(".")[2] == name else getattr(module, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
