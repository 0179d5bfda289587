"""`Matcher`: the grammar state of one branch.

A thin wrapper over `llguidance.LLMatcher` that raises instead of silently
entering llguidance's error state, and forks with the branch: a child's
matcher is a deep copy, so each child continues the grammar from the fork
point independently.

One error state is not raised: llguidance running out of a resource limit
(lexer fuel, Earley items) on an *allowed* token. That is no caller bug and
no reason to fail the engine step: the matcher stays in the error state,
whose masks allow only EOS, so the generation ends and is reported
incomplete. The compiled grammar it came from is dropped from the cache,
since llguidance's lexer, shared by all its copies, stays exhausted.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING

import llguidance

from .errors import GrammarViolation
from .masks import fill_masks, unpack_bitmask

if TYPE_CHECKING:
    import torch

    from .tokenizer import GrammarTokenizer


log = logging.getLogger(__name__)

# llguidance's messages for a resource limit hit while advancing (as opposed
# to `token "x" doesn't satisfy the grammar`). Anchored at the start, so a
# token's own text can never match.
_LIMIT = re.compile(
    r"^(?:parser error: )?"
    r"(?:lexer error:|current row has \d+ items|too many items|fuel exhausted|DNF too large)",
    re.IGNORECASE,
)


def is_limit_error(message: str) -> bool:
    """Whether llguidance's error `message` is a resource limit, not a forbidden token."""
    return bool(_LIMIT.match(message.strip()))


class Matcher:
    """Grammar state of one sequence; create with `Constraint.matcher(tok)`."""

    __slots__ = ("key", "ll", "num_tokens", "tokenizer")

    def __init__(
        self, ll: llguidance.LLMatcher, tokenizer: GrammarTokenizer, key: str | None = None
    ) -> None:
        self.ll = ll
        self.tokenizer = tokenizer
        # The compiled grammar's cache key on `tokenizer` (dropped if exhausted).
        self.key = key
        # Tokens consumed since the start; bounds rollback().
        self.num_tokens = 0

    # ---------------------------------------------------------------- fork

    def fork(self) -> Matcher:
        """An independent copy at the same grammar position."""
        child = Matcher(self.ll.deep_copy(), self.tokenizer, self.key)
        child.num_tokens = self.num_tokens
        return child

    def fork_many(self, n: int) -> list[Matcher]:
        """`n` independent copies (one per child branch)."""
        return [self.fork() for _ in range(n)]

    # ------------------------------------------------------------- advance

    def consume(self, token_id: int) -> None:
        """Advance by one token; raise GrammarViolation if it is not allowed.

        A rejected token leaves the matcher in llguidance's (terminal) error
        state: with masks applied this only happens on a caller bug. A
        resource limit hit on the way is not raised (see the module doc).
        """
        [tid] = self.tokenizer.to_ll_tokens([token_id])
        if not self.ll.consume_token(tid):
            self._failed(f"token {token_id} rejected")
            return
        self.num_tokens += 1

    def consume_many(self, token_ids: Sequence[int]) -> None:
        """Advance by several tokens (e.g. forced ones).

        On GrammarViolation the matcher is left in llguidance's error state
        (as after `consume`); check first with `validate_tokens` if unsure.
        """
        ids = self.tokenizer.to_ll_tokens(token_ids)
        if not self.ll.consume_tokens(ids):
            self._failed("tokens rejected")
            return
        self.num_tokens += len(ids)

    def try_consume(self, token_ids: Sequence[int]) -> int:
        """Consume the longest allowed prefix of `token_ids`; return its length."""
        n = self.ll.try_consume_tokens(self.tokenizer.to_ll_tokens(token_ids))
        self.num_tokens += n
        return n

    def validate_tokens(self, token_ids: Sequence[int]) -> int:
        """How many leading tokens of `token_ids` are allowed; state unchanged."""
        return self.ll.validate_tokens(self.tokenizer.to_ll_tokens(token_ids))

    def rollback(self, n: int) -> None:
        """Undo the last `n` consumed tokens (forced-token / speculative rollback)."""
        if n < 0 or n > self.num_tokens:
            raise ValueError(f"cannot roll back {n} of {self.num_tokens} tokens")
        if n and not self.ll.rollback(n):
            raise GrammarViolation(self._error(f"rollback({n}) failed"))
        self.num_tokens -= n

    def reset(self) -> None:
        """Back to the start of the grammar."""
        self.ll.reset()
        self.num_tokens = 0

    # --------------------------------------------------------------- query

    def forced_tokens(self) -> list[int]:
        """Tokens the grammar forces next (append without sampling); may be [].

        llguidance only returns tokens that stay canonical whatever follows,
        so forced bytes that could merge with the next token are held back.
        """
        return self.ll.compute_ff_tokens()

    def forced_bytes(self) -> bytes:
        """Bytes the grammar forces next (may extend past `forced_tokens`)."""
        return self.ll.compute_ff_bytes()

    def is_accepting(self) -> bool:
        """The output so far is a complete match (EOS is allowed)."""
        return self.ll.is_accepting()

    def is_stopped(self) -> bool:
        """Nothing but EOS can follow (grammar finished, EOS consumed, or error)."""
        return self.ll.is_stopped()

    def is_error(self) -> bool:
        """Whether the matcher hit an error (a rejected token or a bad grammar)."""
        return self.ll.is_error()

    @property
    def error(self) -> str:
        """llguidance's error message, '' when not in an error state."""
        return self.ll.get_error()

    @property
    def stop_reason(self) -> str:
        """llguidance's StopReason ("NotStopped", "EndOfSentence", "NoExtension", ...)."""
        return self.ll.stop_reason()

    def fill_mask(self, bitmask: torch.Tensor, row: int = 0) -> None:
        """Write this matcher's allowed-token bits into `bitmask[row]` (CPU int32)."""
        fill_masks([self], bitmask, [row])

    def allowed_tokens(self) -> list[int]:
        """Allowed next token ids (debugging and tests; use masks in the engine)."""
        bm = self.tokenizer.allocate_bitmask(1, pin_memory=False)
        self.fill_mask(bm)
        return unpack_bitmask(bm, self.tokenizer.vocab_size)[0].nonzero().flatten().tolist()

    def _failed(self, what: str) -> None:
        """Raise GrammarViolation, unless llguidance hit a resource limit."""
        detail = self.ll.get_error()
        if not is_limit_error(detail):
            raise GrammarViolation(self._error(what))
        log.warning("grammar gave up (llguidance limit): %s", self._error(what))
        if self.key is not None:
            self.tokenizer.forget(self.key)

    def _error(self, what: str) -> str:
        detail = self.ll.get_error()
        # llguidance appends a long parser-state dump; the first line says it.
        return f"{what}: {detail.splitlines()[0]}" if detail else what

    def __repr__(self) -> str:
        state = (
            "error"
            if self.is_error()
            else "stopped"
            if self.is_stopped()
            else "accepting"
            if self.is_accepting()
            else "open"
        )
        return f"Matcher({state}, num_tokens={self.num_tokens})"
