"""Limits that keep a script's run finite: loop counts, value sizes, search options.

A script cannot hang the process or exhaust its memory by arithmetic alone:
``2 ** 10**20``, ``"x" * 10**12`` or ``range(10**20)`` fail at once with an
``OverflowError`` (reported at the expression) instead of computing for hours.
Search options are checked against `SEARCH_OPTIONS` before a search starts.
The engine-side limits (fork size, live branches, engine steps) live in
`dendrite.program` (`MAX_FORK`, `MAX_BRANCHES`, `DEFAULT_MAX_STEPS`).
"""

from __future__ import annotations

import math
import operator
from typing import Any, Callable

from dendrite.program.state import MAX_FORK

#: Iterations of any one loop (``repeat``, ``for``, ``while ... max``).
MAX_ITERATIONS = 100_000
#: Loop iterations of one run in all (nested loops multiply).
MAX_TOTAL_ITERATIONS = 1_000_000
#: Characters of a string / items of a list an expression may build.
MAX_SIZE = 10_000_000
#: Bits of an integer an expression may build.
MAX_INT_BITS = 100_000


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_seq(x: Any) -> bool:
    return isinstance(x, (str, list))


def check_size(n: int, what: str) -> None:
    """OverflowError when a result of ``n`` characters/items is too big."""
    if n > MAX_SIZE:
        raise OverflowError(f"{what} would have {n} items, over the limit of {MAX_SIZE}")


def _check_bits(bits: int) -> None:
    if bits > MAX_INT_BITS:
        raise OverflowError(f"integer result too large (about {bits} bits, limit {MAX_INT_BITS})")


def add(a: Any, b: Any) -> Any:
    """``a + b``, refusing a sequence result over the size limit."""
    if _is_seq(a) and _is_seq(b):
        check_size(len(a) + len(b), "the sum")
    return a + b


def mul(a: Any, b: Any) -> Any:
    """``a * b``, refusing a repeated sequence over the size limit."""
    if _is_seq(a) and _is_int(b):
        check_size(len(a) * max(b, 0), "the repetition")
    elif _is_int(a) and _is_seq(b):
        check_size(len(b) * max(a, 0), "the repetition")
    elif _is_int(a) and _is_int(b):
        _check_bits(a.bit_length() + b.bit_length())
    return a * b


def power(a: Any, b: Any) -> Any:
    """``a ** b``, refusing an integer result over the bit limit."""
    if _is_int(a) and _is_int(b) and b > 0 and abs(a) > 1:
        _check_bits(b * (abs(a).bit_length() - 1))
    return a ** b


ARITH: dict[str, Callable[[Any, Any], Any]] = {
    "+": add,
    "-": operator.sub,
    "*": mul,
    "/": operator.truediv,
    "//": operator.floordiv,
    "%": operator.mod,
}


def bounded_range(*args: Any) -> list[int]:
    """``list(range(*args))``, refusing one over the size limit."""
    r = range(*args)
    check_size(len(r), "range()")
    return list(r)


def bounded_replace(s: Any, old: Any, new: Any) -> str:
    """``str.replace``, refusing a result over the size limit."""
    s, old, new = str(s), str(old), str(new)
    hits = s.count(old) if old else len(s) + 1
    check_size(len(s) + hits * (len(new) - len(old)), "replace()")
    return s.replace(old, new)


def bounded_join(sep: Any, items: Any) -> str:
    """``sep.join(items)`` of their strings, refusing a result over the size limit."""
    parts = [str(x) for x in items]
    check_size(sum(map(len, parts)) + len(str(sep)) * max(len(parts) - 1, 0), "join()")
    return str(sep).join(parts)


# ---------------------------------------------------------------- search options


def _int_in(low: int, high: int, optional: bool = False) -> Callable[[Any], str | None]:
    def check(v: Any) -> str | None:
        if optional and v is None:
            return None
        if not _is_int(v) or not low <= v <= high:
            none = " or none" if optional else ""
            return f"must be an int in [{low}, {high}]{none}, got {v!r}"
        return None

    return check


def _real(low: float = -math.inf, strict_low: bool = False, optional: bool = False) -> Callable[[Any], str | None]:
    def check(v: Any) -> str | None:
        if optional and v is None:
            return None
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        if ok and (v <= low if strict_low else v < low):
            ok = False
        if not ok:
            bound = "" if low == -math.inf else (f" > {low:g}" if strict_low else f" >= {low:g}")
            none = " or none" if optional else ""
            return f"must be a finite number{bound}{none}, got {v!r}"
        return None

    return check


def _one_of(*values: Any) -> Callable[[Any], str | None]:
    def check(v: Any) -> str | None:
        if v not in values or isinstance(v, bool) != isinstance(values[0], bool):
            return f"must be one of {', '.join(repr(x) for x in values)}, got {v!r}"
        return None

    return check


#: Every option a ``search`` statement can pass, with what its value must be.
#: Widths are bounded by the engine's fork limit, depths and counts by the loop limit.
SEARCH_OPTIONS: dict[str, Callable[[Any], str | None]] = {
    "width": _int_in(1, MAX_FORK),
    "n": _int_in(1, MAX_FORK),
    "keep": _int_in(1, MAX_FORK),
    "parallel": _int_in(1, MAX_FORK),
    "rollouts": _int_in(0, MAX_FORK),
    "depth": _int_in(1, MAX_ITERATIONS),
    "iterations": _int_in(1, MAX_ITERATIONS),
    "max_expansions": _int_in(1, MAX_ITERATIONS),
    "rollout_depth": _int_in(0, MAX_ITERATIONS, optional=True),
    "c": _real(0.0),
    "prior_temperature": _real(0.0, strict_low=True),
    "length_penalty": _real(),
    "threshold": _real(optional=True),
    "policy": _one_of("uct", "puct"),
    "dedupe": _one_of(True, False),
}


def check_search_option(name: str, value: Any) -> str | None:
    """Why ``value`` is bad for search option ``name`` (``"width must be ..."``), or None."""
    check = SEARCH_OPTIONS.get(name)
    if check is None:
        return None
    why = check(value)
    return f"search option '{name}' {why}" if why else None
