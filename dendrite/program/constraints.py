"""Turn a gen's constraint option into a ``dendrite.grammar`` Constraint."""

from __future__ import annotations

import json
from typing import Any


def constraint_key(kind: str, spec: Any) -> tuple[str, str]:
    """A hashable cache key for ``(kind, spec)``."""
    if isinstance(spec, (dict, list, tuple, bool)):
        return kind, json.dumps(spec, sort_keys=True)
    return kind, str(spec)


def compile_constraint(engine: Any, kind: str, spec: Any) -> Any:
    """Build the Constraint for one of regex / json_schema / grammar / choices.

    The engine compiles it for its tokenizer on submit; building it here
    validates the spec early and lets the runtime share one object per spec.
    """
    from dendrite.grammar.constraint import Constraint

    if kind == "choices":
        spec = list(spec)
    return Constraint(**{kind: spec})
