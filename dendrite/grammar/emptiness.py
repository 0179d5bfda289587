"""Does a grammar match any string at all?

llguidance accepts grammars whose language is empty (a regex like
`[^\\s\\S]`, a `$ref` to itself, a lark rule that only ever recurses) and
only fails once generation starts, or never finishes. Two checks, run when a
Constraint is built (tokenizer-free, cached by grammar text):

* `grammar_is_empty`: the first mask of a fresh matcher on a 256-byte
  tokenizer (`first_mask_problem`). Nothing allowed and the empty output not
  accepted means no string can start; llguidance says so itself
  ("NoExtension...") when its lexer or parser has no way on. With a model's
  tokenizer, at compile, the same check finds grammars whose strings that
  vocabulary cannot spell.
* `lark_dead_end`: a lark start rule that cannot derive a finite string
  (`a: "x" a`) still allows "x" first, so the first mask cannot tell. The
  `lark` package parses the grammar and the productive rules are found by the
  usual fixpoint; regex terminals are checked with `grammar_is_empty`. A
  reachable rule that cannot finish is reported too, though start can:
  llguidance's masks would lead outputs into it. Grammars in llguidance's
  extensions of lark that lark cannot read (`%json`, `[lazy]`, ...) get no
  verdict here; special tokens (`<|eot|>`) are read as literals.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Sequence
from typing import ClassVar

import llguidance
import torch

from .errors import panic_message
from .masks import unpack_bitmask

# llguidance's special-token syntax: <|name|> and <[id, id-id, ...]>.
_SPECIAL = re.compile(r"<\|[^|\s]*\|>|<\[[^\]]*\]>")
# llguidance's stop reasons when the grammar has no way forward.
_NO_WAY_ON = ("NoExtension",)


class _ByteTokens:
    """A tokenizer whose tokens are the 256 bytes (+ EOS): every string is reachable."""

    eos_token_id: ClassVar[int] = 256
    bos_token_id: ClassVar[int | None] = None
    tokens: ClassVar[list[bytes]] = [bytes([i]) for i in range(256)] + [b"<eos>"]
    special_token_ids: ClassVar[list[int]] = [256]

    def __call__(self, text: bytes | str) -> list[int]:
        return list(text if isinstance(text, bytes) else text.encode("utf-8"))


@functools.lru_cache(maxsize=1)
def byte_tokenizer() -> llguidance.LLTokenizer:
    """An LLTokenizer of single bytes, for tokenizer-independent checks."""
    return llguidance.LLTokenizer(llguidance.TokenizerWrapper(_ByteTokens()))


def first_mask_problem(
    matcher: llguidance.LLMatcher, tokenizer: llguidance.LLTokenizer, eos_ids: Sequence[int]
) -> tuple[str, bool] | None:
    """Why no output can even start, or None if one can.

    Returns (message, empty): `empty` is True when the grammar has no way on
    (llguidance stopped with NoExtension, or nothing but EOS is allowed
    while the empty output is not accepted), False for another llguidance
    error at the first step (a resource limit, say), whose first line is the
    message. `matcher` is not advanced: the check runs on a copy.
    """
    if matcher.is_accepting():
        return None  # the empty string matches
    probe = matcher.deep_copy()
    words = (tokenizer.vocab_size + 31) // 32
    mask = torch.zeros(1, words, dtype=torch.int32)
    probe.unsafe_compute_mask_ptr(mask.data_ptr(), 4 * words)
    if probe.is_error():
        first = probe.get_error().strip().splitlines()
        reason = first[0] if first else probe.stop_reason()
        if any(k in reason for k in _NO_WAY_ON):
            return f"llguidance: {reason}", True
        return reason, False
    allowed = unpack_bitmask(mask, tokenizer.vocab_size)[0]
    allowed[list(eos_ids)] = False
    if not allowed.any():
        return "no token can start it", True
    return None


@functools.lru_cache(maxsize=512)
def grammar_is_empty(grammar_text: str) -> str | None:
    """llguidance's reason when `grammar_text` matches no byte string, else None.

    On the byte tokenizer: independent of any model's vocabulary, and cheap
    (a mask of 257 tokens). None also when llguidance rejects the grammar
    for another reason (that is for validation to report).
    """
    tok = byte_tokenizer()
    try:
        m = llguidance.LLMatcher(tok, grammar_text, log_level=0)
        if m.is_error():
            return None
        found = first_mask_problem(m, tok, [_ByteTokens.eos_token_id])
    except BaseException as e:  # noqa: BLE001 - a panic is no verdict; anything else is raised
        if panic_message(e) is None:
            raise
        return None
    return found[0] if found is not None and found[1] else None


@functools.lru_cache(maxsize=256)
def lark_dead_end(text: str) -> tuple[str, int | None] | None:
    """(why, line) when lark grammar `text` cannot finish, or can reach a dead end.

    "grammar matches no string" when the start rule cannot derive a finite
    string; "grammar has a dead end" when it can but reaches a rule or
    terminal that cannot (every output entering it would run on forever or
    get stuck). None when neither, or when the `lark` package cannot read
    the grammar. Line numbers are those of `text` (the special-token
    stand-ins keep lines).
    """
    from lark.lexer import PatternRE
    from lark.load_grammar import GrammarBuilder

    # Special tokens (<|eot|>, <[128009]>) are llguidance's; to lark they are
    # a literal standing for some token, which is as productive as they are.
    plain = _SPECIAL.sub('"<special>"', text)
    try:
        builder = GrammarBuilder()
        builder.load_grammar(plain, "<grammar>")
        terminals, rules, _ = builder.build().compile(["start"], set())
    except Exception:  # noqa: BLE001 - llguidance's dialect: no verdict, not an error
        return None
    dead_terminals = {
        t.name: t.pattern
        for t in terminals
        if isinstance(t.pattern, PatternRE)
        and grammar_is_empty(llguidance.LLMatcher.grammar_from_regex(t.pattern.to_regexp()))
    }
    alternatives: dict[str, list[list[tuple[str, bool]]]] = {}
    for r in rules:
        alternatives.setdefault(r.origin.name, []).append(
            [(s.name, s.is_term) for s in r.expansion]
        )

    productive: set[str] = set()

    def alive(sym: tuple[str, bool]) -> bool:
        name, is_term = sym
        return name not in dead_terminals if is_term else name in productive

    changed = True
    while changed:
        changed = False
        for name, alts in alternatives.items():
            if name not in productive and any(all(map(alive, alt)) for alt in alts):
                productive.add(name)
                changed = True
    if "start" not in alternatives:
        return None
    if "start" not in productive:
        return _explain(
            "grammar matches no string", ["start"], None, alternatives, alive, dead_terminals, text
        )

    # Start can finish, but a rule or terminal it reaches that cannot would
    # let outputs into dead ends (llguidance's masks do not prune them).
    parents: dict[str, list[str]] = {"start": ["start"]}
    queue = ["start"]
    while queue:
        rule = queue.pop(0)
        for alt in alternatives.get(rule, []):
            for sym in alt:
                name, is_term = sym
                if not alive(sym):
                    return _explain(
                        "grammar has a dead end",
                        parents[rule],
                        sym,
                        alternatives,
                        alive,
                        dead_terminals,
                        text,
                    )
                if not is_term and name not in parents:
                    parents[name] = [*parents[rule], name]
                    queue.append(name)
    return None


def _explain(
    prefix: str,
    path: list[str],
    dead: tuple[str, bool] | None,
    alternatives: dict[str, list[list[tuple[str, bool]]]],
    alive: Callable[[tuple[str, bool]], bool],
    dead_terminals: dict[str, object],
    text: str,
) -> tuple[str, int | None]:
    """Walk down through dead symbols to an empty terminal or a cycle.

    Starts at `dead` (a dead symbol used by rule `path[-1]`), or else at the
    first dead symbol of `path[-1]`'s first alternative (all are dead then).
    """
    path = list(path)
    while True:
        if dead is None:
            dead = next(s for s in alternatives[path[-1]][0] if not alive(s))
        name, is_term = dead
        dead = None
        if is_term:
            shown = _terminal_name(name, dead_terminals[name])
            trail = " -> ".join([*_named(path), shown])
            return f"{prefix}: terminal {shown} matches no string ({trail})", _line_of(text, name)
        if name in path:
            cycle = path[path.index(name) :]
            culprit = (_named(cycle) or _named(path) or ["start"])[0]
            trail = " -> ".join([*_named(path), name if not name.startswith("__") else culprit])
            why = (
                f"{prefix}: rule {culprit!r} cannot derive a finite string "
                f"(every alternative needs it again: {trail})"
            )
            return why, _line_of(text, culprit)
        path.append(name)


def _named(rules: list[str]) -> list[str]:
    """Drop lark's generated helper rules (`__start_star_0`) from a path."""
    return [r for r in rules if not r.startswith("__")]


def _terminal_name(name: str, pattern: object) -> str:
    """A terminal as the user wrote it: its name, or /regex/ if anonymous."""
    if name.startswith("__"):
        return f"/{getattr(pattern, 'value', pattern)}/"
    return name


def _line_of(text: str, name: str) -> int | None:
    """1-based line where rule or terminal `name` is defined, if found."""
    if name.startswith("__"):
        return None
    pat = re.compile(rf"^[ \t]*[?!]?{re.escape(name)}(\.-?\d+)?[ \t]*:", re.MULTILINE)
    m = pat.search(text)
    return text.count("\n", 0, m.start()) + 1 if m else None
