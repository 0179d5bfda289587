"""Grammar-constrained generation through llguidance.

tok = GrammarTokenizer(tokenizers_tokenizer, eos_token_id, vocab_size=model_vocab)
c = Constraint(json_schema={...})        # GrammarError if invalid
c.compile(tok)                           # per (spec, tokenizer), cached
m = c.matcher(tok)                       # one per branch; m.fork() per child
fill_masks([m, ...], bitmask, rows)      # CPU, GIL released
MaskWorker().start(handles)              # a step's masks while its forward runs
apply_masks(logits, bitmask)             # disallowed -> -inf (unpack_bitmask: to bool)
m.consume(token) / m.forced_tokens()
grammar_status(m, finish_reason)         # "complete" | "incomplete"
"""

from .constraint import Constraint, choices_to_lark
from .errors import GrammarError, GrammarViolation
from .masks import (
    Constrained,
    MaskSource,
    MaskWorker,
    apply_masks,
    fill_masks,
    unpack_bitmask,
)
from .matcher import Matcher
from .status import GrammarStatus, grammar_status, is_complete
from .tokenizer import GrammarTokenizer

__all__ = [
    "Constrained",
    "Constraint",
    "GrammarError",
    "GrammarStatus",
    "GrammarTokenizer",
    "GrammarViolation",
    "MaskSource",
    "MaskWorker",
    "Matcher",
    "apply_masks",
    "choices_to_lark",
    "fill_masks",
    "grammar_status",
    "is_complete",
    "unpack_bitmask",
]
