"""Names a .dendrite script can use without defining them.

* `STATE_NAMES`: read-only values of the current branch (``logprob``...).
* `FUNCTIONS`: pure functions over values (``len``, ``number``, ``match``...).
* `AGGREGATES`: evaluate their argument in *every* state of the frontier and
  combine the results (``vote(answer)``, ``collect(x)``, ``mean(x)``, ``count(c)``).
* ``judge(template, ...)``: only after ``by``; a model-judged score.
"""

from __future__ import annotations

import json as _json
import math
import re
from typing import Any, Callable

from dendrite.program.answers import number, vote
from dendrite.program.state import State
from .limits import bounded_join, bounded_range, bounded_replace

#: Branch values: name -> getter.
STATE_NAMES: dict[str, Callable[[State], Any]] = {
    "logprob": lambda s: s.logprob,
    "sum_logprob": lambda s: s.sum_logprob,
    "tokens": lambda s: s.num_gen_tokens,
    "score": lambda s: s.score,
    "text": lambda s: s.text,
    "depth": lambda s: s.depth,
    "finish_reason": lambda s: s.finish_reason,
}


def match(text: Any, pattern: str, default: Any = None) -> Any:
    """First regex match in ``text`` (group 1 if the pattern has a group), or ``default``."""
    m = re.search(pattern, str(text))
    if not m:
        return default
    return m.group(1) if m.groups() else m.group(0)


def parse_json(text: Any, default: Any = None) -> Any:
    """``json.loads(text)`` or ``default`` when it is not JSON."""
    try:
        return _json.loads(str(text))
    except ValueError:
        return default


def _contains(hay: Any, needle: Any) -> bool:
    return needle in hay


FUNCTIONS: dict[str, Callable[..., Any]] = {
    "len": len,
    "int": int,
    "float": float,
    "str": str,
    "bool": bool,
    "abs": abs,
    "min": min,
    "max": max,
    "round": round,
    "sum": sum,
    "sorted": sorted,
    "range": bounded_range,
    "sqrt": math.sqrt,
    "log": math.log,
    "exp": math.exp,
    "lower": lambda s: str(s).lower(),
    "upper": lambda s: str(s).upper(),
    "strip": lambda s, chars=None: str(s).strip(chars),
    "split": lambda s, sep=None: str(s).split(sep),
    "join": bounded_join,
    "replace": bounded_replace,
    "contains": _contains,
    "startswith": lambda s, p: str(s).startswith(p),
    "endswith": lambda s, p: str(s).endswith(p),
    "number": number,
    "match": match,
    "json": parse_json,
}


def _mean(values: list[Any]) -> float | None:
    vals = [float(v) for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


AGGREGATES: dict[str, Callable[[list[Any]], Any]] = {
    "vote": vote,
    "collect": list,
    "mean": _mean,
    "count": lambda values: sum(1 for v in values if v),
}

#: Functions only allowed as a ``by`` clause.
SCORER_FUNCTIONS = ("judge",)

RESERVED = set(STATE_NAMES) | set(FUNCTIONS) | set(AGGREGATES) | set(SCORER_FUNCTIONS)
