"""Chat roles (``s.system(...)``, ``s.user(...)``, ``s.assistant(gen(...))``): the template side.

Turns are rendered through the model's own chat template
(``engine.tokenizer.apply_chat_template``), incrementally: a role's *begin*
op renders the messages so far plus the new turn's opening and appends only
what is new; its *end* op renders again with the turn's content (the text
appended inside the role, generations included) and appends the rest. The
state's text therefore equals ``apply_chat_template(messages)`` (with the
generation prompt while an assistant turn is open), and earlier turns' KV is
reused. A template whose rendering of turn k+1 does not start with what was
already appended (it rewrites an earlier turn) is an error: appended tokens
cannot be taken back. The ops, scopes and ``user(...)`` expressions that
call this live in `dendrite.program.state`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

ROLES = ("system", "user", "assistant")
#: Stands for a turn's content while its opening is rendered (content unknown yet).
_SENTINEL = "\x00dendrite-content\x00"


@dataclass
class ChatLog:
    """A state's conversation: messages so far and where in its text it began."""

    base: int  # len(state text) when the first turn began
    skip: int = 0  # chars of the rendering not appended (a BOS when the chat starts mid-text)
    messages: list[dict[str, str]] = field(default_factory=list)
    role: str | None = None  # the turn being written
    start: int = 0  # len(state text) where that turn's content began

    def copy(self) -> ChatLog:
        """An independent copy for a forked branch (its turns then diverge)."""
        return ChatLog(self.base, self.skip, [dict(m) for m in self.messages], self.role, self.start)


#: ``append(text)``: append template text to the state (no BOS of the tokenizer's own).
Append = Callable[[str], None]


def _render(tokenizer: Any, messages: list[dict[str, str]], gen_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, add_generation_prompt=gen_prompt)


def _extend(text: str, log: ChatLog, rendered: str, append: Append, what: str) -> None:
    """Append what ``rendered`` adds to the chat text (``text[log.base:]``) already there."""
    rendered = rendered[log.skip:]
    have = text[log.base:]
    if not rendered.startswith(have):
        raise ValueError(
            f"chat template of this model is not incremental at {what}: the rendering no longer "
            f"starts with the text already appended ({have[-40:]!r}); text appended outside "
            f"a role, or a template that rewrites earlier turns, cannot be continued")
    if len(rendered) > len(have):
        append(rendered[len(have):])


def begin_turn(log: ChatLog | None, text: str, tokenizer: Any, role: str, append: Append) -> ChatLog:
    """Open a ``role`` turn on a state whose text is ``text``; returns its (new) log."""
    if role not in ROLES:
        raise ValueError(f"chat: unknown role {role!r} (one of {', '.join(ROLES)})")
    if log is None:
        log = ChatLog(base=len(text))
        bos = getattr(tokenizer, "bos_token", None) or ""
        if text and bos and _render(tokenizer, [], False).startswith(bos):
            log.skip = len(bos)  # a BOS belongs at the start of a sequence only
    if log.role is not None:
        raise ValueError(f"chat: a {role} turn began inside the open {log.role} turn")
    if role == "assistant":
        opening = _render(tokenizer, log.messages, True)
    else:
        full = _render(tokenizer, [*log.messages, {"role": role, "content": _SENTINEL}], False)
        if _SENTINEL not in full:
            raise ValueError(f"chat template of this model drops {role} messages")
        opening = full.split(_SENTINEL, 1)[0]
    _extend(text, log, opening, append, f"the start of a {role} turn")
    return log


def end_turn(log: ChatLog | None, text: str, tokenizer: Any, role: str, append: Append) -> None:
    """Close the open ``role`` turn: its content is ``text`` since the turn began."""
    if log is None or log.role != role:
        raise ValueError(f"chat: end of a {role} turn that is not open")
    content = text[log.start:]
    eos = getattr(tokenizer, "eos_token", None) or ""
    if eos and content.endswith(eos):
        content = content[: -len(eos)]  # a gen that ended on EOS: the template adds its own
    log.messages.append({"role": role, "content": content})
    log.role = None
    _extend(text, log, _render(tokenizer, log.messages, False), append, f"the end of a {role} turn")
