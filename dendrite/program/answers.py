"""Answer helpers shared by the search library and scripts: numbers and votes."""

from __future__ import annotations

import re
from collections import Counter
from typing import Any

_NUM = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def number(text: Any, default: Any = None) -> Any:
    """The last number in ``text`` (int when integral, commas dropped), or ``default``."""
    found = _NUM.findall(str(text))
    if not found:
        return default
    try:
        v = float(found[-1].replace(",", ""))
    except ValueError:
        return default
    return int(v) if v.is_integer() else v


def _key(v: Any) -> Any:
    try:
        hash(v)
        return v
    except TypeError:
        return repr(v)


def vote(values: list[Any]) -> Any:
    """Majority value (None ignored; ties go to the value seen first)."""
    vals = [v for v in values if v is not None]
    if not vals:
        return None
    counts = Counter(_key(v) for v in vals)
    best = max(counts.values())
    for v in vals:
        if counts[_key(v)] == best:
            return v
    return None  # pragma: no cover
