"""Parse .dendrite source into a lark tree, turning lark's errors into ScriptErrors.

The grammar lives in ``dendrite/dsl/dendrite.lark``; indentation is handled by lark's
``Indenter`` post-lexer. Only lark's own error objects are used for positions
(``UnexpectedInput.line``/``.column``); this module just words them for people.
"""

from __future__ import annotations

import functools
from pathlib import Path

from lark import Lark, Token, Tree
from lark.exceptions import (
    LarkError,
    UnexpectedCharacters,
    UnexpectedEOF,
    UnexpectedInput,
    UnexpectedToken,
)
from lark.indenter import Indenter

from .errors import ScriptSyntaxError

GRAMMAR_PATH = Path(__file__).with_name("dendrite.lark")

# How terminals read in "expected ..." messages.
_FRIENDLY = {
    "NAME": "a name",
    "NUMBER": "a number",
    "STRING": "a string",
    "LONG_STRING": "a string",
    "_NL": "end of line",
    "_INDENT": "an indented block",
    "_DEDENT": "end of block",
    "$END": "end of file",
}


class _IndentError(LarkError):
    """Inconsistent dedent, raised by the post-lexer with the spot."""

    def __init__(self, message: str, line: int, column: int):
        super().__init__(message)
        self.line, self.column = line, column


class _DendriteIndenter(Indenter):
    """Python-style INDENT/DEDENT tokens; errors carry a position."""

    NL_type = "_NL"
    OPEN_PAREN_types = ["LPAR", "LSQB", "LBRACE"]
    CLOSE_PAREN_types = ["RPAR", "RSQB", "RBRACE"]
    INDENT_type = "_INDENT"
    DEDENT_type = "_DEDENT"
    tab_len = 8

    def handle_NL(self, token: Token):
        if self.paren_level > 0:
            return
        yield token
        indent_str = token.rsplit("\n", 1)[1]
        indent = indent_str.count(" ") + indent_str.count("\t") * self.tab_len
        if indent > self.indent_level[-1]:
            self.indent_level.append(indent)
            yield Token.new_borrow_pos(self.INDENT_type, indent_str, token)
            return
        while indent < self.indent_level[-1]:
            self.indent_level.pop()
            yield Token.new_borrow_pos(self.DEDENT_type, indent_str, token)
        if indent != self.indent_level[-1]:
            raise _IndentError(
                "unindent does not match any outer indentation level",
                token.end_line,
                token.end_column,
            )

    def _process(self, stream):
        # As lark's, but an unbalanced ')' is left for the parser to report.
        for token in super()._process(self._clamp(stream)):
            yield token

    def process(self, stream):
        self.open_parens: list[Token] = []
        return super().process(stream)

    def _clamp(self, stream):
        for token in stream:
            if token.type in self.OPEN_PAREN_types:
                self.open_parens.append(token)
            elif token.type in self.CLOSE_PAREN_types:
                if self.open_parens:
                    self.open_parens.pop()
                if self.paren_level == 0:
                    self.paren_level += 1  # the parser rejects the token; keep the count sane
            yield token


@functools.lru_cache(maxsize=1)
def _parser() -> Lark:
    return Lark(
        GRAMMAR_PATH.read_text(),
        parser="lalr",
        postlex=_DendriteIndenter(),
        propagate_positions=True,
        maybe_placeholders=True,
        start=["start", "expr"],
    )


def _describe_terminal(name: str) -> str:
    if name in _FRIENDLY:
        return _FRIENDLY[name]
    try:
        term = _parser().get_terminal(name)
    except KeyError:
        return name
    if term.pattern.type == "str":
        return f"'{term.pattern.value}'"
    return name.lower()


def _describe_token(token: Token) -> str:
    if token.type == "$END":
        return "end of file"
    if token.type == "_NL":
        return "end of line"
    if token.type == "_INDENT":
        return "indent"
    if token.type == "_DEDENT":
        return "end of block"
    if token.type == "NAME":
        return f"name '{token.value}'"
    if token.type in ("STRING", "LONG_STRING"):
        return "string"
    if token.type == "NUMBER":
        return f"number {token.value}"
    return f"'{token.value}'"


def _expected_text(expected) -> str:
    names = sorted({_describe_terminal(e) for e in expected})
    if not names or len(names) > 6:
        return ""
    if len(names) == 1:
        return f", expected {names[0]}"
    return ", expected " + ", ".join(names[:-1]) + " or " + names[-1]


def _token_position(token: Token) -> tuple[int, int]:
    if token.type in ("_INDENT", "_DEDENT") and token.end_line is not None:
        return token.end_line, token.end_column
    return token.line or 1, token.column or 1


def parse(source: str, filename: str = "<script>") -> Tree:
    """Parse a whole script; raise `ScriptSyntaxError` at the offending spot."""
    text = source if source.endswith("\n") else source + "\n"
    try:
        return _parser().parse(text, start="start")
    except _IndentError as e:
        raise ScriptSyntaxError(str(e), filename, source, e.line, e.column) from None
    except UnexpectedToken as e:
        tok = e.token
        line, column = _token_position(tok)
        opened = getattr(_parser().options.postlex, "open_parens", None)
        if tok.type in ("$END", "_DEDENT") and opened:
            p = opened[-1]
            raise ScriptSyntaxError(
                f"'{p.value}' was never closed", filename, source, p.line, p.column
            ) from None
        if tok.type == "$END" or line > len(source.splitlines()):
            lines = source.rstrip("\n").splitlines() or [""]
            line, column = len(lines), len(lines[-1]) + 1
        if tok.type == "_INDENT":
            msg = "unexpected indent"
        else:
            msg = f"unexpected {_describe_token(tok)}{_expected_text(e.expected)}"
        raise ScriptSyntaxError(msg, filename, source, line, column) from None
    except UnexpectedCharacters as e:
        ch = text[e.pos_in_stream] if e.pos_in_stream < len(text) else ""
        if ch in "\"'":
            msg = "unterminated string"
        elif ch == "\t" or ch == " ":
            msg = "unexpected whitespace"
        else:
            msg = f"unexpected character {ch!r}"
        raise ScriptSyntaxError(msg, filename, source, e.line, e.column) from None
    except UnexpectedEOF as e:
        lines = source.splitlines() or [""]
        raise ScriptSyntaxError(
            f"unexpected end of file{_expected_text(e.expected)}",
            filename,
            source,
            len(lines),
            len(lines[-1]) + 1,
        ) from None
    except UnexpectedInput as e:  # pragma: no cover - other lark subclasses
        raise ScriptSyntaxError(str(e).splitlines()[0], filename, source, e.line, e.column) from None


def _shift(tree: Tree, line: int, column: int) -> None:
    """Move positions of a sub-parse that started at (line, column) in the file."""

    def fix(obj) -> None:
        if getattr(obj, "line", None) is not None:
            if obj.line == 1:
                obj.column += column - 1
            obj.line += line - 1
        end_line = getattr(obj, "end_line", None)
        if end_line is not None:
            if end_line == 1:
                obj.end_column += column - 1
            obj.end_line += line - 1

    for sub in tree.iter_subtrees():
        if not sub.meta.empty:
            fix(sub.meta)
        for c in sub.children:
            if isinstance(c, Token):
                fix(c)


def parse_expression(src: str, filename: str, source: str, line: int, column: int) -> Tree:
    """Parse an interpolated ``{expr}`` found at line:column of ``source``."""
    try:
        tree = _parser().parse(src, start="expr")
    except UnexpectedInput as e:
        el = getattr(e, "line", 1) or 1
        ec = getattr(e, "column", 1) or 1
        if isinstance(e, UnexpectedEOF) or el < 1:
            el, ec = 1, len(src) + 1
        tok = getattr(e, "token", None)
        if isinstance(e, UnexpectedToken):
            what = f"unexpected {_describe_token(tok)}" if tok is not None and tok.type != "$END" else "incomplete expression"
        elif isinstance(e, UnexpectedCharacters):
            what = f"unexpected character {src[e.pos_in_stream]!r}"
        else:
            what = "incomplete expression"
        if isinstance(e, UnexpectedToken) and tok is not None and tok.type == "$END":
            el, ec = 1, len(src) + 1
        raise ScriptSyntaxError(
            f"{what} in {{...}}",
            filename,
            source,
            line + el - 1,
            (column + ec - 1) if el == 1 else ec,
        ) from None
    if isinstance(tree, Token):  # pragma: no cover - expr always yields a tree
        return tree
    _shift(tree, line, column)
    return tree
