"""Speculative decoding with tree verification, built on fork (issue 18).

A drafter proposes a tree of likely next tokens for each decoding branch;
the target model checks every path of every branch in one batched forward;
the longest accepted path is committed into the branch's KV and the other
paths' forks are released in the same step. Output is exactly the target's:
token for token what a non-speculative run with the same seeds produces.

`Engine(..., speculative=SpeculativeConfig(...))` turns it on;
`SpeculativeConfig.parse("ngram:k=4")` reads the string form of the command
line (`--speculative`) and of the DSL's `run(speculative=...)`. How it works,
the on/off rule and how to plug in an EAGLE head: docs/speculative.md.
"""

from dendrite.speculative.config import METHODS, SpeculativeConfig, speculating
from dendrite.speculative.drafters import (
    Drafter,
    ExpandingDrafter,
    ModelDrafter,
    NgramDrafter,
    TokenizerMismatch,
    check_same_tokenizer,
)
from dendrite.speculative.tree import (
    DraftTree,
    Expansion,
    TreeShape,
    build_dynamic,
    build_static,
)

__all__ = [
    "METHODS",
    "DraftTree",
    "Drafter",
    "ExpandingDrafter",
    "Expansion",
    "ModelDrafter",
    "NgramDrafter",
    "SpeculativeConfig",
    "TokenizerMismatch",
    "TreeShape",
    "build_dynamic",
    "build_static",
    "check_same_tokenizer",
    "speculating",
]
