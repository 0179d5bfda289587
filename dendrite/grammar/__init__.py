"""Grammar-constrained generation through llguidance.

tok = GrammarTokenizer(tokenizers_tokenizer, eos_token_id, vocab_size=model_vocab)
c = Constraint(json_schema={...})        # GrammarError if invalid
c.compile(tok)                           # per (spec, tokenizer), cached
m = c.matcher(tok)                       # one per branch; m.fork() per child
fill_masks([m, ...], bitmask, rows)      # CPU, GIL released (MaskWorker to overlap)
apply_masks(logits, bitmask)             # disallowed -> -inf
m.consume(token) / m.forced_tokens()
grammar_status(m, finish_reason)         # "complete" | "incomplete"
"""

from .constraint import Constraint, choices_to_lark
from .errors import GrammarError, GrammarViolation
from .masks import MaskWorker, apply_masks, fill_masks, unpack_bitmask
from .matcher import Matcher
from .status import GrammarStatus, grammar_status, is_complete
from .tokenizer import GrammarTokenizer

__all__ = [
    "Constraint",
    "GrammarError",
    "GrammarStatus",
    "GrammarTokenizer",
    "GrammarViolation",
    "MaskWorker",
    "Matcher",
    "apply_masks",
    "choices_to_lark",
    "fill_masks",
    "grammar_status",
    "is_complete",
    "unpack_bitmask",
]
