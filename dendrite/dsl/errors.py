"""Errors raised for .dendrite scripts, located at file:line:col with a caret.

Every error a script can cause, at parse time, compile time (unknown names,
options, statements out of place) or run time (a failing expression), is a
`ScriptError`. Its text is the familiar compiler layout::

    tot.dendrite:12:9: unknown gen option 'temprature' (did you mean 'temperature'?)
        gen thought(temprature=0.8)
                    ^
"""

from __future__ import annotations

import difflib
from typing import Iterable


class ScriptError(Exception):
    """An error in a .dendrite script, with its position in the source.

    Attributes: ``filename``, ``line`` and ``column`` (both 1-based),
    ``message`` (without the position), ``source_line`` (the offending line,
    or ``""`` when the position lies past the end of the text).
    """

    def __init__(self, message: str, filename: str, source: str, line: int, column: int):
        self.message = message
        self.filename = filename
        self.line = max(1, int(line))
        self.column = max(1, int(column))
        lines = source.splitlines()
        self.source_line = lines[self.line - 1] if 0 < self.line <= len(lines) else ""
        super().__init__(self.format())

    @property
    def location(self) -> str:
        """``file:line:col``."""
        return f"{self.filename}:{self.line}:{self.column}"

    def format(self) -> str:
        """The message, the source line and a caret under the column."""
        head = f"{self.location}: {self.message}"
        if not self.source_line:
            return head
        # Keep tabs in the caret line so the caret lines up under tabs too.
        prefix = "".join(c if c == "\t" else " " for c in self.source_line[: self.column - 1])
        return f"{head}\n    {self.source_line}\n    {prefix}^"


class ScriptSyntaxError(ScriptError):
    """The script does not parse (bad token, bad indentation, unclosed string)."""


class ScriptNameError(ScriptError):
    """A name the script uses is not defined, or an option/function is unknown."""


class ScriptRuntimeError(ScriptError):
    """An expression of the script failed while the program ran."""


def did_you_mean(name: str, candidates: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` for the closest candidate, or ``""``."""
    close = difflib.get_close_matches(name, sorted(set(candidates)), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""
