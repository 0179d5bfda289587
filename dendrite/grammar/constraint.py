"""`Constraint`: one regex / JSON schema / lark grammar / choice list.

Building a Constraint validates the spec with llguidance and checks that it
matches some string (tokenizer-free; see `emptiness`); `compile(tokenizer)`
adds the tokenizer-dependent checks and caches the compiled grammar on the
tokenizer. Both raise `GrammarError` and allocate nothing the engine owns, so
a request can be rejected before it touches the KV pool.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import llguidance

from .emptiness import first_mask_problem, grammar_is_empty, lark_dead_end
from .errors import (
    ConstraintKind,
    GrammarError,
    lark_position,
    panic_message,
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
        self._check(_validate(self.grammar_text))
        if self.kind != "choices":  # a non-empty choice list always matches
            self._check_matches_something()

    # ------------------------------------------------------------------ API

    def compile(self, tokenizer: GrammarTokenizer) -> None:
        """Compile for `tokenizer` (cached on it); raise GrammarError if invalid.

        The engine calls this when a request is submitted, before allocating.
        """
        self._prototype(tokenizer)

    def matcher(self, tokenizer: GrammarTokenizer) -> Matcher:
        """A fresh matcher at the start of the grammar (compiles on first use)."""
        return Matcher(self._prototype(tokenizer).deep_copy(), tokenizer, self.key)

    # ------------------------------------------------------------ internals

    def _prototype(self, tokenizer: GrammarTokenizer) -> llguidance.LLMatcher:
        def build() -> llguidance.LLMatcher:
            try:
                m = _LLM(tokenizer.ll, self.grammar_text, log_level=0)
                if m.is_error():
                    self._check(m.get_error(), with_tokenizer=True)
                for w in m.get_grammar_warnings():
                    log.warning("grammar warning (%s): %s", self.kind, w)
                self._check_tokenizer_can_start(m, tokenizer)
            except BaseException as e:  # noqa: BLE001 - only llguidance's panics, below
                panic = panic_message(e)
                if panic is None:
                    raise
                raise GrammarError(self.kind, panic) from None
            return m

        return tokenizer.compiled(self.key, build)

    def _check_matches_something(self) -> None:
        """GrammarError if the spec matches no string at all, or (lark) has a dead end.

        Tokenizer-free (llguidance on a byte tokenizer, the `lark` package) so
        it fails where other spec errors do; both checks are cached by text,
        so a spec seen before costs nothing here.
        """
        if self.kind == "grammar":
            self._raise_dead_end()
        reason = grammar_is_empty(self.grammar_text)
        if reason is None:
            return
        if self.kind == "json_schema":
            self._raise_empty_schema()
        raise GrammarError(self.kind, f"grammar matches no string ({reason})")

    def _check_tokenizer_can_start(self, m: llguidance.LLMatcher, tok: GrammarTokenizer) -> None:
        """GrammarError if no output can start with this tokenizer's tokens.

        The spec matches some string (checked when it was built), so an empty
        first mask means its strings cannot be spelled in this vocabulary.
        """
        found = first_mask_problem(m, tok.ll, tok.eos_token_ids)
        if found is None:
            return
        reason, empty = found
        if not empty:  # llguidance failed at the first step (e.g. a limit)
            self._check(reason, with_tokenizer=True)
        raise GrammarError(
            self.kind, f"grammar matches no string this tokenizer can produce ({reason})"
        )

    def _raise_dead_end(self) -> None:
        """GrammarError naming the rule or terminal that keeps a lark grammar from finishing."""
        dead = lark_dead_end(self.spec)
        if dead is not None:
            message, line = dead
            raise GrammarError("grammar", message, line=line, column=1 if line else None)

    def _raise_empty_schema(self) -> None:
        """GrammarError at the subschema that leaves a JSON schema matching nothing."""

        def problem(schema: Any) -> str:
            return _schema_problem(schema, self._json_options)

        message = problem(self._schema)
        if message:
            path = locate_schema_error(self._schema, message, problem)
            raise GrammarError("json_schema", message, json_path=path)

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
    """Schema as a Python object; JSON text errors carry line:col.

    A key repeated in one object of the text is an error: JSON parsers keep
    only the last, so the schema would not be the one the user reads.
    """
    if isinstance(spec, str):
        repeated: dict[int, str] = {}
        # Objects with a repeated key stay referenced here, so an id is never
        # reused by a later object when a repeat discards an earlier value.
        keep: list[dict[str, Any]] = []

        def pairs_hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
            obj: dict[str, Any] = {}
            for k, v in pairs:
                if k in obj and id(obj) not in repeated:
                    repeated[id(obj)] = k
                    keep.append(obj)
                obj[k] = v
            return obj

        try:
            doc = json.loads(spec, object_pairs_hook=pairs_hook)
        except json.JSONDecodeError as e:
            raise GrammarError(
                "json_schema", f"schema is not valid JSON: {e.msg}", line=e.lineno, column=e.colno
            ) from None
        except RecursionError:
            raise GrammarError("json_schema", "schema is nested too deeply to parse") from None
        if repeated:
            path, key = _first_repeated(doc, repeated)
            raise GrammarError(
                "json_schema",
                f"key {key!r} appears more than once in one object (JSON keeps only the last)",
                json_path=path,
            )
        return doc
    if isinstance(spec, (Mapping, bool)):
        return dict(spec) if isinstance(spec, Mapping) else spec
    raise TypeError("json_schema must be a dict, bool or JSON str")


def _first_repeated(doc: Any, repeated: dict[int, str]) -> tuple[str, str]:
    """(JSON pointer, key) of the first object, in document order, with a repeated key."""
    stack: list[tuple[Any, str]] = [(doc, "")]
    while stack:  # iterative: the text may nest deeper than Python recursion allows
        node, path = stack.pop()
        if isinstance(node, dict):
            if id(node) in repeated:
                key = repeated[id(node)]
                return path + "/" + _escape(key), key
            items = list(node.items())
        elif isinstance(node, list):
            items = list(enumerate(node))
        else:
            continue
        stack.extend((v, f"{path}/{_escape(str(k))}") for k, v in reversed(items))
    raise AssertionError("repeated key not found")  # pragma: no cover - ids come from doc


def _escape(key: str) -> str:
    """One JSON-pointer reference token (RFC 6901)."""
    return key.replace("~", "~0").replace("/", "~1")


def _schema_problem(schema: Any, options: dict[str, Any] | None) -> str:
    """Validation error, else "grammar matches no string (...)" if so, else ''."""
    error = _schema_error(schema, options)
    if error:
        return error
    reason = grammar_is_empty(_LLM.grammar_from_json_schema(schema, overrides=options))
    return f"grammar matches no string ({reason})" if reason else ""


def _schema_error(schema: Any, options: dict[str, Any] | None) -> str:
    """llguidance's validation message for `schema` ('' when valid)."""
    try:
        return _validate(_LLM.grammar_from_json_schema(schema, overrides=options))
    except ValueError as e:
        return str(e)


def _validate(grammar_text: str) -> str:
    """llguidance's validation message ('' when valid); a panic becomes its message."""
    try:
        return _LLM.validate_grammar(grammar_text)
    except BaseException as e:  # noqa: BLE001 - only llguidance's panics, below
        panic = panic_message(e)
        if panic is None:
            raise
        return panic
