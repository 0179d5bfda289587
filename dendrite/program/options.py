"""The options a `gen` accepts, checked once, shared by the Python DSL and scripts.

``State.gen(name, **options)`` and the script statement ``gen name(...)`` take
exactly these keywords; anything else is an error naming the closest option.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field
from typing import Any

#: Sampling options, passed to ``dendrite.sampling.SamplingParams``.
SAMPLING_OPTIONS: tuple[str, ...] = (
    "max_tokens",
    "stop",
    "stop_token_ids",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "repetition_penalty",
    "ignore_eos",
    "include_stop",
)
#: Constraint options (at most one per gen), compiled by ``dendrite.grammar``.
CONSTRAINT_OPTIONS: tuple[str, ...] = ("regex", "json_schema", "grammar", "choices")
#: Every option ``gen`` accepts.
GEN_OPTIONS: tuple[str, ...] = SAMPLING_OPTIONS + CONSTRAINT_OPTIONS

#: ``max_tokens`` when a gen names none (SGLang's default too).
DEFAULT_MAX_TOKENS = 128
#: Largest ``max_tokens`` a gen may ask for (more than any context window).
MAX_GEN_TOKENS = 1 << 24


class GenOptionError(TypeError):
    """An unknown or malformed ``gen`` option; ``option`` names it."""

    def __init__(self, message: str, option: str):
        super().__init__(message)
        self.option = option


def suggest(name: str, candidates) -> str:
    """`` (did you mean 'x'?)`` or ``""``."""
    close = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


@dataclass(frozen=True)
class GenSpec:
    """One generation request: where it is captured and how it is sampled."""

    name: str | None  # None: an unnamed gen, appended but not captured
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def sampling(self) -> dict[str, Any]:
        """The sampling keywords, with ``max_tokens`` defaulted and ``stop`` a list."""
        return self.sampling_with({})

    def sampling_with(self, defaults: dict[str, Any]) -> dict[str, Any]:
        """`sampling` over a run's ``defaults`` (``run(temperature=0)``): the gen's own options win."""
        out = {k: v for k, v in defaults.items() if v is not None}
        out.update((k, v) for k, v in self.options.items() if k in SAMPLING_OPTIONS and v is not None)
        out.setdefault("max_tokens", DEFAULT_MAX_TOKENS)
        stop = out.get("stop")
        if isinstance(stop, str):
            out["stop"] = [stop]
        elif stop is not None:
            out["stop"] = list(stop)
        return out

    @property
    def constraint(self) -> tuple[str, Any] | None:
        """``(kind, spec)`` of the constraint, or None."""
        for k in CONSTRAINT_OPTIONS:
            v = self.options.get(k)
            if v is not None:
                return k, v
        return None


def check_gen_options(options: dict[str, Any]) -> None:
    """Raise `GenOptionError` for unknown names, bad types or two constraints."""
    for k in options:
        if k not in GEN_OPTIONS:
            raise GenOptionError(f"unknown gen option '{k}'{suggest(k, GEN_OPTIONS)}", k)
    given = [k for k in CONSTRAINT_OPTIONS if options.get(k) is not None]
    if len(given) > 1:
        raise GenOptionError(
            f"gen takes at most one constraint, got {', '.join(given)}", given[1]
        )
    mt = options.get("max_tokens")
    if mt is not None and (not isinstance(mt, int) or isinstance(mt, bool) or mt < 1):
        raise GenOptionError(f"max_tokens must be a positive int, got {mt!r}", "max_tokens")
    if mt is not None and mt > MAX_GEN_TOKENS:
        raise GenOptionError(f"max_tokens={mt} exceeds the limit of {MAX_GEN_TOKENS}", "max_tokens")
    _check_sampling(options)
    choices = options.get("choices")
    if choices is not None:
        if isinstance(choices, str) or not all(isinstance(c, str) for c in choices) or not choices:
            raise GenOptionError("choices must be a non-empty list of strings", "choices")
    for k in ("regex", "grammar"):
        v = options.get(k)
        if v is not None and not isinstance(v, str):
            raise GenOptionError(f"{k} must be a string, got {type(v).__name__}", k)


def _check_sampling(options: dict[str, Any]) -> None:
    """Check each sampling value now, where it is given, rather than at submit.

    ``SamplingParams`` is the one judge of a value (its messages name the
    field); it is built with one option at a time so a failure belongs to
    that option. ``stop``/``ignore_eos`` are checked here: SamplingParams
    takes any iterable as ``stop`` and any value as ``ignore_eos``;
    ``include_stop`` here too, so the error names the gen option.
    """
    stop = options.get("stop")
    if stop is not None and not isinstance(stop, str):
        if not isinstance(stop, (list, tuple)) or not all(isinstance(x, str) for x in stop):
            raise GenOptionError(f"stop must be a string or a list of strings, got {stop!r}", "stop")
    ie = options.get("ignore_eos")
    if ie is not None and not isinstance(ie, bool):
        raise GenOptionError(f"ignore_eos must be true or false, got {ie!r}", "ignore_eos")
    inc = options.get("include_stop")
    if inc is not None and not isinstance(inc, bool):
        raise GenOptionError(f"include_stop must be true or false, got {inc!r}", "include_stop")
    sids = options.get("stop_token_ids")
    if sids is not None and (isinstance(sids, bool) or not isinstance(sids, (int, list, tuple))):
        raise GenOptionError(f"stop_token_ids must be a list of token ids, got {sids!r}", "stop_token_ids")
    fields = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "stop_token_ids")
    given = {k: options[k] for k in fields if options.get(k) is not None}
    if not given:
        return
    from dendrite.sampling import SamplingParams

    for k, v in given.items():
        try:
            SamplingParams(**{k: v})
        except (TypeError, ValueError, OverflowError) as e:
            raise GenOptionError(str(e), k) from None
    tk = given.get("top_k")
    if tk is not None and abs(tk) > 1 << 31:
        raise GenOptionError(f"top_k must fit in 32 bits, got {tk}", "top_k")


def make_spec(name: str | None, options: dict[str, Any]) -> GenSpec:
    """Validate and freeze a gen request (``name=None``: appended, not captured)."""
    if name is not None and (not isinstance(name, str) or not name):
        raise TypeError(f"gen's capture name must be a non-empty string or None, got {name!r}")
    check_gen_options(options)
    return GenSpec(name, dict(options))


def choices_regex(choices: list[str]) -> str:
    """A regex that matches exactly one of ``choices``."""
    return "(" + "|".join(re.escape(c) for c in choices) + ")"
