"""Chat roles: ``s.system(...)``, ``s.user(...)``, ``s.assistant(gen(...))``.

Turns are rendered through the model's own chat template
(``engine.tokenizer.apply_chat_template``), incrementally: a role's *begin*
op renders the messages so far plus the new turn's opening and appends only
what is new; its *end* op renders again with the turn's content (the text
appended inside the role, generations included) and appends the rest. The
state's text therefore equals ``apply_chat_template(messages)`` (with the
generation prompt while an assistant turn is open), and earlier turns' KV is
reused. A template whose rendering of turn k+1 does not start with what was
already appended (it rewrites an earlier turn) is an error: appended tokens
cannot be taken back.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from dendrite.program.state import Appendable, State, _Op, _TextOp

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
        return ChatLog(self.base, self.skip, [dict(m) for m in self.messages], self.role, self.start)


def _render(rt: Any, messages: list[dict[str, str]], gen_prompt: bool) -> str:
    return rt.engine.tokenizer.apply_chat_template(messages, add_generation_prompt=gen_prompt)


def _extend(state: State, rt: Any, log: ChatLog, rendered: str, what: str) -> None:
    """Append what ``rendered`` adds to the chat text the state already holds."""
    rendered = rendered[log.skip:]
    have = state._text[log.base:]
    if not rendered.startswith(have):
        raise ValueError(
            f"chat template of this model is not incremental at {what}: the rendering no longer "
            f"starts with the text already appended ({have[-40:]!r}); text appended outside "
            f"a role, or a template that rewrites earlier turns, cannot be continued")
    new = rendered[len(have):]
    if new:
        _TextOp(new, add_bos=False).start(state, rt)


class _RoleBegin(_Op):
    needs_seq = True
    makes_seq = True  # a lazy root's sequence starts with the template's text (its own BOS)

    def __init__(self, role: str):
        self.role = role

    def start(self, state, rt):
        log = state._chat
        if log is None:
            log = state._chat = ChatLog(base=len(state._text))
            bos = getattr(rt.engine.tokenizer, "bos_token", None) or ""
            if state._text and bos and _render(rt, [], False).startswith(bos):
                log.skip = len(bos)  # a BOS belongs at the start of a sequence only
        if log.role is not None:
            raise ValueError(f"chat: a {self.role} turn began inside the open {log.role} turn")
        if self.role == "assistant":
            opening = _render(rt, log.messages, True)
        else:
            full = _render(rt, log.messages + [{"role": self.role, "content": _SENTINEL}], False)
            if _SENTINEL not in full:
                raise ValueError(f"chat template of this model drops {self.role} messages")
            opening = full.split(_SENTINEL, 1)[0]
        _extend(state, rt, log, opening, f"the start of a {self.role} turn")
        log.role, log.start = self.role, len(state._text)
        return True


class _RoleEnd(_Op):
    needs_seq = True
    makes_seq = True  # a lazy root's sequence starts with the template's text (its own BOS)

    def __init__(self, role: str):
        self.role = role

    def start(self, state, rt):
        log = state._chat
        if log is None or log.role != self.role:
            raise ValueError(f"chat: end of a {self.role} turn that is not open")
        content = state._text[log.start:]
        eos = getattr(rt.engine.tokenizer, "eos_token", None) or ""
        if eos and content.endswith(eos):
            content = content[: -len(eos)]  # a gen that ended on EOS: the template adds its own
        log.messages.append({"role": self.role, "content": content})
        log.role = None
        _extend(state, rt, log, _render(rt, log.messages, False), f"the end of a {self.role} turn")
        return True


class RoleExpr(Appendable):
    """``s += dendrite.program.user("hi")`` (SGLang's ``sgl.user(...)``)."""

    __slots__ = ("content", "role")

    def __init__(self, role: str, content: Any):
        self.role, self.content = role, content

    def append_to(self, state: State) -> None:
        state._role(self.role, self.content)


def system(content: Any) -> RoleExpr:
    """A system turn to append: ``s += system("Be brief.")``."""
    return RoleExpr("system", content)


def user(content: Any) -> RoleExpr:
    """A user turn to append: ``s += user("Hi")``."""
    return RoleExpr("user", content)


def assistant(content: Any) -> RoleExpr:
    """An assistant turn to append: ``s += assistant(gen("answer"))``."""
    return RoleExpr("assistant", content)


class RoleScope:
    """``with s.user(): s += ...``: everything appended inside is the turn's content."""

    def __init__(self, state: State, role: str):
        self.state, self.role = state, role

    def __enter__(self) -> State:
        self.state._push(_RoleBegin(self.role))
        return self.state

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.state._push(_RoleEnd(self.role))


class VarScope:
    """``with s.var_scope("name"):``: the text appended inside becomes ``s["name"]``."""

    def __init__(self, state: State, name: str):
        if not isinstance(name, str) or not name:
            raise TypeError(f"var_scope needs a capture name (a non-empty string), got {name!r}")
        self.state, self.name = state, name

    def __enter__(self) -> State:
        self.state.then(lambda st: st._marks.__setitem__(self.name, len(st._text)))
        return self.state

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            def capture(st: State) -> None:
                text = st._text[st._marks.pop(self.name):]
                st._captures[self.name] = text
                st.node.captures[self.name] = text
            self.state.then(capture)
