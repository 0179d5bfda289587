"""`Constraint`: one regex / JSON schema / lark grammar / choice list.

Building a Constraint validates the spec with llguidance (tokenizer-free
checks); `compile(tokenizer)` adds the tokenizer-dependent checks and caches
the compiled grammar on the tokenizer. Both raise `GrammarError` and allocate
nothing the engine owns, so a request can be rejected before it touches the
KV pool.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import llguidance

from .errors import (
    ConstraintKind,
    GrammarError,
    lark_position,
    regex_offset,
    strip_regex_wrapper,
)
from .locate import locate_schema_error
from .matcher import Matcher
from .tokenizer import GrammarTokenizer

log = logging.getLogger(__name__)

_LLM = llguidance.LLMatcher


def choices_to_lark(choices: Sequence[str]) -> str:
    """A lark grammar matching exactly one of `choices`.

    All choices form one terminal (one lexeme), so llguidance's lexer, a lazy
    DFA, tells them apart byte by byte. As alternatives of the start *rule*
    each choice would be a separate Earley item, and llguidance allows at
    most 2000 items in a row: past ~2000 choices, generation failed mid-way
    ("Current row has 2001 items"). Lark string literals use JSON escapes,
    so json.dumps quotes any text (quotes, backslashes, newlines, regex
    metacharacters, non-ASCII) safely. Duplicates dropped.
    """
    unique = list(dict.fromkeys(choices))
    return "start: CHOICE\nCHOICE: " + " | ".join(json.dumps(c) for c in unique) + "\n"


class Constraint:
    r"""Exactly one of `regex=`, `json_schema=`, `grammar=` (lark), `choices=`.

    Args:
        regex: pattern the whole output must match, in Rust `regex` syntax:
            `\d`, `\w`, `\s` are Unicode-aware (`\d` admits e.g. Devanagari
            digits), so write `[0-9]` for ASCII digits.
        json_schema: a schema as a dict or JSON text.
        grammar: a lark grammar in llguidance's dialect (`start:` rule).
        choices: the output is exactly one of these strings.
        json_options: llguidance JSON compile overrides for `json_schema`
            (e.g. {"whitespace_flexible": False}); see JsonCompileOptions.

    Raises:
        GrammarError: the spec is invalid (message + location).
        TypeError: not exactly one spec given, or wrong types.
    """

    __slots__ = ("_json_options", "_schema", "grammar_text", "key", "kind", "spec")

    def __init__(
        self,
        *,
        regex: str | None = None,
        json_schema: Mapping[str, Any] | str | bool | None = None,
        grammar: str | None = None,
        choices: Sequence[str] | None = None,
        json_options: Mapping[str, Any] | None = None,
    ) -> None:
        given = {
            k: v
            for k, v in (
                ("regex", regex),
                ("json_schema", json_schema),
                ("grammar", grammar),
                ("choices", choices),
            )
            if v is not None
        }
        if len(given) != 1:
            raise TypeError(
                f"Constraint needs exactly one of regex=, json_schema=, grammar=, choices=; got {sorted(given)}"
            )
        if json_options is not None and json_schema is None:
            raise TypeError("json_options only applies to json_schema=")
        kind: ConstraintKind
        [(kind, spec)] = given.items()  # type: ignore[assignment]
        self.kind: ConstraintKind = kind
        self._schema: Any = None
        self._json_options = dict(json_options) if json_options else None

        if kind == "regex":
            if not isinstance(spec, str):
                raise TypeError("regex must be a str")
            self.spec: Any = spec
            self.grammar_text = _LLM.grammar_from_regex(spec)
        elif kind == "grammar":
            if not isinstance(spec, str):
                raise TypeError("grammar must be a str (lark)")
            self.spec = spec
            self.grammar_text = _LLM.grammar_from_lark(spec)
        elif kind == "choices":
            if isinstance(spec, str) or not all(isinstance(c, str) for c in spec):
                raise TypeError("choices must be a sequence of str")
            self.spec = tuple(spec)
            _check_choices(self.spec)
            self.grammar_text = _LLM.grammar_from_lark(choices_to_lark(self.spec))
        else:
            self._schema = _parse_schema(spec)
            self.spec = self._schema
            try:
                self.grammar_text = _LLM.grammar_from_json_schema(
                    self._schema, overrides=self._json_options
                )
            except ValueError as e:  # not a JSON object / bad options
                raise GrammarError("json_schema", str(e)) from None
        self.key = f"{self.kind}\0{self.grammar_text}"
        self._check(_LLM.validate_grammar(self.grammar_text))

    # ------------------------------------------------------------------ API

    def compile(self, tokenizer: GrammarTokenizer) -> None:
        """Compile for `tokenizer` (cached on it); raise GrammarError if invalid.

        The engine calls this when a request is submitted, before allocating.
        """
        self._prototype(tokenizer)

    def matcher(self, tokenizer: GrammarTokenizer) -> Matcher:
        """A fresh matcher at the start of the grammar (compiles on first use)."""
        return Matcher(self._prototype(tokenizer).deep_copy(), tokenizer)

    # ------------------------------------------------------------ internals

    def _prototype(self, tokenizer: GrammarTokenizer) -> llguidance.LLMatcher:
        def build() -> llguidance.LLMatcher:
            m = _LLM(tokenizer.ll, self.grammar_text, log_level=0)
            if m.is_error():
                self._check(m.get_error(), with_tokenizer=True)
            for w in m.get_grammar_warnings():
                log.warning("grammar warning (%s): %s", self.kind, w)
            return m

        return tokenizer.compiled(self.key, build)

    def _check(self, message: str, *, with_tokenizer: bool = False) -> None:
        """Raise GrammarError for a non-empty llguidance error message."""
        if not message:
            return
        if self.kind == "json_schema":

            def error_of(schema: Any) -> str:
                return _schema_error(schema, self._json_options)

            # Localization compares tokenizer-free messages; an error that
            # only shows with the tokenizer cannot be localized that way.
            path = None
            if not with_tokenizer or error_of(self._schema) == message:
                path = locate_schema_error(self._schema, message, error_of)
            raise GrammarError("json_schema", message, json_path=path)
        if self.kind == "regex":
            body = strip_regex_wrapper(message)
            raise GrammarError("regex", body, offset=regex_offset(body))
        if self.kind == "choices":
            # Positions point into the generated grammar, not at a choice;
            # what can fail here is a size limit (the list is checked).
            raise GrammarError("choices", _choices_limit_message(self.spec, message))
        pos = lark_position(message)
        if pos is None:
            raise GrammarError(self.kind, message)
        raise GrammarError(self.kind, message, line=pos[0], column=pos[1])

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Constraint) and other.key == self.key

    def __hash__(self) -> int:
        return hash(self.key)

    def __repr__(self) -> str:
        text = self.spec if isinstance(self.spec, str) else json.dumps(self.spec)
        if len(text) > 60:
            text = text[:57] + "..."
        return f"Constraint({self.kind}={text!r})"


def _check_choices(choices: tuple[str, ...]) -> None:
    """GrammarError for an empty list or a choice that is not encodable text."""
    if not choices:
        raise GrammarError("choices", "choices must not be empty")
    for i, c in enumerate(choices):
        try:
            c.encode("utf-8")
        except UnicodeEncodeError as e:
            raise GrammarError(
                "choices", f"choices[{i}] is not valid Unicode ({e.reason} at index {e.start})"
            ) from None


def _choices_limit_message(choices: tuple[str, ...], message: str) -> str:
    """llguidance's complaint about a choice list, without the echoed grammar."""
    first = message.strip().splitlines()[0] if message.strip() else message
    pos = lark_position(first)
    if pos is not None:  # drop "at L(C): " (a place in the generated grammar)
        first = first.split(":", 1)[1].strip()
    size = sum(len(c.encode("utf-8")) for c in choices)
    return (
        f"{len(choices)} choices ({size} bytes in all) exceed a llguidance limit: {first}; "
        "use fewer or shorter choices, or a regex"
    )


def _parse_schema(spec: Any) -> Any:
    """Schema as a Python object; JSON text errors carry line:col."""
    if isinstance(spec, str):
        try:
            return json.loads(spec)
        except json.JSONDecodeError as e:
            raise GrammarError(
                "json_schema", f"schema is not valid JSON: {e.msg}", line=e.lineno, column=e.colno
            ) from None
    if isinstance(spec, (Mapping, bool)):
        return dict(spec) if isinstance(spec, Mapping) else spec
    raise TypeError("json_schema must be a dict, bool or JSON str")


def _schema_error(schema: Any, options: dict[str, Any] | None) -> str:
    """llguidance's validation message for `schema` ('' when valid)."""
    try:
        return _LLM.validate_grammar(_LLM.grammar_from_json_schema(schema, overrides=options))
    except ValueError as e:
        return str(e)
