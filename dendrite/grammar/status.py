"""Whether a constrained generation produced a complete, valid output.

The rule that matters: output cut by max_tokens is never reported as valid
unless the grammar could not have continued anyway. A cut `\\d+` after "12"
matches the regex but is still a truncation, so it is `incomplete`.
"""

from __future__ import annotations

from typing import Literal

from .matcher import Matcher

GrammarStatus = Literal["complete", "incomplete"]


def grammar_status(matcher: Matcher | None, finish_reason: str) -> GrammarStatus:
    """`complete` or `incomplete` for a finished generation.

    Args:
        matcher: the branch's matcher after its last token (None when the
            generation was unconstrained).
        finish_reason: "eos", "stop" (stop string / stop token) or "length".

    Rules:
        * error state: incomplete.
        * "length": complete only if the grammar is finished (`is_stopped`:
          nothing but EOS could follow); otherwise the output was cut.
        * "eos" / "stop" (or other reasons): complete iff the grammar accepts
          the output. A stop string ending a constrained generation early
          therefore yields `incomplete` unless the text so far is accepted.
        * unconstrained: complete unless cut by "length".
    """
    if matcher is None:
        return "incomplete" if finish_reason == "length" else "complete"
    if matcher.is_error():
        return "incomplete"
    if finish_reason == "length":
        return "complete" if matcher.is_stopped() else "incomplete"
    return "complete" if matcher.is_accepting() else "incomplete"


def is_complete(matcher: Matcher | None, finish_reason: str) -> bool:
    """`grammar_status(...) == "complete"`, for `GenResult.complete`."""
    return grammar_status(matcher, finish_reason) == "complete"
