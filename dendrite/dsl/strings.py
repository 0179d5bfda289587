"""String literals of .dendrite scripts: escapes and ``{expr}`` interpolation.

``"Question: {question}\\n"`` is split into literal pieces and expression
pieces, each expression with its own line/column in the file, so errors in
an interpolated expression point into the string. ``{{`` and ``}}`` are
literal braces; ``r"..."`` strings are raw (no escapes, no interpolation).
"""

from __future__ import annotations

from dataclasses import dataclass

_ESCAPES = {
    "n": "\n",
    "t": "\t",
    "r": "\r",
    "0": "\0",
    "\\": "\\",
    "'": "'",
    '"': '"',
}


class StringError(Exception):
    """A malformed literal; ``line``/``column`` point at the bad spot."""

    def __init__(self, message: str, line: int, column: int):
        super().__init__(message)
        self.line, self.column = line, column


@dataclass
class Piece:
    """A literal run of text (``expr is None``) or an interpolated expression."""

    text: str
    expr: str | None = None
    line: int = 0
    column: int = 0


def _open_quote(raw: str) -> tuple[bool, str]:
    is_raw = raw[:1] in "rR"
    body = raw[1:] if is_raw else raw
    quote = body[:3] if body[:3] in ('"""', "'''") else body[:1]
    return is_raw, quote


def split_string(raw: str, line: int, column: int) -> list[Piece]:
    """Split the source text of a string token (quotes included) into pieces."""
    is_raw, quote = _open_quote(raw)
    start = (1 if is_raw else 0) + len(quote)
    body = raw[start : len(raw) - len(quote)]
    # positions of every character of body
    pos = []
    ln, col = line, column + start
    for ch in body:
        pos.append((ln, col))
        if ch == "\n":
            ln, col = ln + 1, 1
        else:
            col += 1
    pos.append((ln, col))
    if is_raw:
        return [Piece(body)]

    pieces: list[Piece] = []
    buf: list[str] = []
    i, n = 0, len(body)

    def flush() -> None:
        if buf:
            pieces.append(Piece("".join(buf)))
            buf.clear()

    while i < n:
        ch = body[i]
        if ch == "\\" and i + 1 < n:
            nxt = body[i + 1]
            if nxt == "\n":  # line continuation
                i += 2
                continue
            if nxt in "{}":
                buf.append(nxt)
                i += 2
                continue
            if nxt == "x":
                try:
                    buf.append(chr(int(body[i + 2 : i + 4], 16)))
                    i += 4
                    continue
                except ValueError:
                    raise StringError("bad \\x escape", *pos[i]) from None
            if nxt == "u":
                try:
                    buf.append(chr(int(body[i + 2 : i + 6], 16)))
                    i += 6
                    continue
                except ValueError:
                    raise StringError("bad \\u escape", *pos[i]) from None
            buf.append(_ESCAPES.get(nxt, "\\" + nxt))
            i += 2
            continue
        if ch == "{":
            if i + 1 < n and body[i + 1] == "{":
                buf.append("{")
                i += 2
                continue
            j = _matching_brace(body, i)
            if j < 0:
                raise StringError("'{' in string is never closed (write '{{' for a brace)", *pos[i])
            src = body[i + 1 : j]
            if not src.strip():
                raise StringError("empty '{}' in string", *pos[i])
            flush()
            lead = len(src) - len(src.lstrip())
            pieces.append(Piece("", src.strip(), *pos[i + 1 + lead]))
            i = j + 1
            continue
        if ch == "}":
            if i + 1 < n and body[i + 1] == "}":
                buf.append("}")
                i += 2
                continue
            raise StringError("single '}' in string (write '}}' for a brace)", *pos[i])
        buf.append(ch)
        i += 1
    flush()
    return pieces


def _matching_brace(body: str, i: int) -> int:
    """Index of the '}' closing the '{' at ``i`` (quotes and nesting respected)."""
    depth, quote = 0, None
    j = i
    while j < len(body):
        c = body[j]
        if quote:
            if c == "\\":
                j += 1
            elif c == quote:
                quote = None
        elif c in "'\"":
            quote = c
        elif c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return j
        j += 1
    return -1


def literal_value(raw: str, line: int = 1, column: int = 1) -> str | None:
    """The value of a string with no interpolation, or None if it interpolates."""
    pieces = split_string(raw, line, column)
    if any(p.expr is not None for p in pieces):
        return None
    return "".join(p.text for p in pieces)
