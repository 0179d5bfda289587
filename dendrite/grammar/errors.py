"""Grammar errors: llguidance's message plus where in the user's spec it points.

`GrammarError` is raised before generation, when a constraint is built or
compiled, so callers can reject a request before touching the KV pool.
`GrammarViolation` is raised when a token the grammar forbids is consumed,
which means a mask was not applied (a bug in the caller), not a user error.
"""

from __future__ import annotations

import re
from typing import Literal

ConstraintKind = Literal["regex", "json_schema", "grammar", "choices"]

# Lark errors from llguidance start with "at L(C): ..." or "L(C): ...".
_LARK_POS = re.compile(r"^(?:at )?(\d+)\((\d+)\):")
# Rust `regex` syntax errors quote the pattern indented by 4 spaces and put a
# caret line under the offending span.
_REGEX_CARET = re.compile(r"regex parse error:\n    ([^\n]*)\n    ( *)\^")


class GrammarError(ValueError):
    """An invalid regex, JSON schema, lark grammar or choice list.

    `str()` is one line: the kind, the location and the gist of the message
    (llguidance's caret diagrams and grammar snippets left out; the
    location says where).

    Attributes:
        kind: which spec was invalid.
        message: llguidance's message, verbatim (may span lines).
        location: human-readable position: a JSON pointer for schemas
            ("#/properties/age/minimum"), "line L, col C" for lark grammars,
            "offset N" (0-based, in the pattern) for regexes; None if unknown.
        line, column: 1-based position in a lark grammar, when given.
        json_path: JSON pointer into the schema ("" is the root), when found.
        offset: 0-based character offset into a regex, when given.
    """

    def __init__(
        self,
        kind: ConstraintKind,
        message: str,
        *,
        line: int | None = None,
        column: int | None = None,
        json_path: str | None = None,
        offset: int | None = None,
    ) -> None:
        self.kind = kind
        self.message = message
        self.line = line
        self.column = column
        self.json_path = json_path
        self.offset = offset
        if json_path is not None:
            self.location: str | None = "#" + json_path
        elif line is not None:
            self.location = f"line {line}, col {column}"
        elif offset is not None:
            self.location = f"offset {offset}"
        else:
            self.location = None
        where = f" at {self.location}" if self.location else ""
        super().__init__(f"invalid {kind}{where}: {one_line(message)}")


class GrammarViolation(RuntimeError):
    """A token the grammar does not allow was consumed (mask not applied)."""


def panic_message(e: BaseException) -> str | None:
    """One line for a Rust panic inside llguidance, None for any other exception.

    pyo3 raises panics as `PanicException`, a BaseException that cannot be
    imported by name; llguidance panics on some invalid input (e.g. when an
    error message it formats cuts a UTF-8 character in two).
    """
    if type(e).__name__ != "PanicException":
        return None
    first = str(e).strip().splitlines()[0] if str(e).strip() else "panic"
    if len(first) > 160:
        first = first[:157] + "..."
    return f"llguidance failed on it (internal error: {first})"


def one_line(message: str) -> str:
    """The gist of an llguidance message in one line.

    Rust regex errors end with "error: <what>" under a caret diagram; lark
    errors start with "at L(C): <what>" above a snippet of the grammar.
    """
    lines = [ln.strip() for ln in message.strip().splitlines() if ln.strip()]
    if not lines:
        return message.strip()
    if lines[0].startswith("regex parse error:") and lines[-1].startswith("error: "):
        return lines[-1][len("error: ") :]
    first = lines[0]
    m = _LARK_POS.match(first)
    return first[m.end() :].strip() if m else first


def lark_position(message: str) -> tuple[int, int] | None:
    """(line, column) from an llguidance lark error message, if it has one."""
    m = _LARK_POS.match(message.strip())
    return (int(m.group(1)), int(m.group(2))) if m else None


def regex_offset(message: str) -> int | None:
    """0-based offset of the caret in a Rust regex parse error, if present."""
    m = _REGEX_CARET.search(message)
    return len(m.group(2)) if m else None


def strip_regex_wrapper(message: str) -> str:
    """Drop llguidance's "at 1(8): invalid regex ... (in regex): " prefix.

    A regex constraint is compiled as the lark grammar `start: /.../`, so the
    lark position refers to that wrapper, not to anything the user wrote.
    """
    i = message.find("regex parse error:")
    if i < 0:
        return message
    # The trailing "   1 | start: /.../" snippet also shows the wrapper.
    body = message[i:]
    j = body.find("\n   1 | ")
    return body[:j] if j >= 0 else body
