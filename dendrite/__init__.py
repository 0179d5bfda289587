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

from dendrite.kv import BlockPool, KVTree, OutOfPages, RadixCache, Scheduler, check_invariants


_LAZY = {
    "Engine": "dendrite.engine",
    "Sequence": "dendrite.engine",
    "GenResult": "dendrite.engine",
    "LeafTooLarge": "dendrite.engine",
    "SamplingParams": "dendrite.sampling",
    "Constraint": "dendrite.grammar",
    "GrammarError": "dendrite.grammar",
    "Program": "dendrite.program",
    "State": "dendrite.program",
    "gen": "dendrite.program",
    "select": "dendrite.program",
    "prune": "dendrite.program",
    "score": "dendrite.program",
    "load_script": "dendrite.dsl",
    "search": "dendrite.search",
}

__all__ = ["BlockPool", "KVTree", "OutOfPages", "RadixCache", "Scheduler", "check_invariants",
           *_LAZY]
__version__ = "0.1.0"


def __getattr__(name: str):
    if name in _LAZY:
        module = importlib.import_module(_LAZY[name])
        value = module if name == "search" else getattr(module, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'dendrite' has no attribute {name!r}")
