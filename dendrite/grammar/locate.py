"""Find the JSON-schema location of an llguidance schema error.

llguidance reports *what* is wrong with a schema ("Invalid type: strin") but
not *where*. We localize it with llguidance itself: descend the schema,
replacing one subschema at a time with the always-valid `{}`; the subschema
whose replacement changes the error contains it. At the deepest such node we
try dropping each keyword to name the offending one. A `$ref` at that node
is followed when emptying its target changes the error too, so an error
behind a chain of refs (a -> b -> bad keyword) is reported in b, not at the
first `$ref`. Only the validator decides; nothing here re-implements schema
rules. Runs only on the error path, with a bounded number of validations.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import unquote

# Keywords whose value is one subschema, a {name: subschema} map, or a list.
_SINGLE = (
    "additionalProperties",
    "additionalItems",
    "items",
    "contains",
    "not",
    "if",
    "then",
    "else",
    "propertyNames",
    "unevaluatedItems",
    "unevaluatedProperties",
)
# Definitions first: an error inside a referenced definition is reported
# there, not at the first `$ref` that pulls it in.
_MAPS = ("$defs", "definitions", "properties", "patternProperties", "dependentSchemas")
_LISTS = ("allOf", "anyOf", "oneOf", "prefixItems", "items")

Path = tuple[str | int, ...]


def _children(node: Any) -> Iterator[Path]:
    """Relative paths of the direct subschemas of `node`."""
    if not isinstance(node, dict):
        return
    for key in _MAPS:
        value = node.get(key)
        if isinstance(value, dict):
            for name, sub in value.items():
                if isinstance(sub, (dict, bool)):
                    yield (key, name)
    for key in _LISTS:
        value = node.get(key)
        if isinstance(value, list):
            for i, sub in enumerate(value):
                if isinstance(sub, (dict, bool)):
                    yield (key, i)
    for key in _SINGLE:
        if isinstance(node.get(key), dict):
            yield (key,)


def _get(doc: Any, path: Path) -> Any:
    for p in path:
        doc = doc[p]
    return doc


def _replaced(doc: Any, path: Path, value: Any = None, *, delete: bool = False) -> Any:
    """`doc` with the node at `path` set to `value` (or deleted); `doc` is unchanged.

    Only the containers along `path` are copied (shallowly): no recursion, so
    schemas nested thousands deep are fine, and each try is O(depth).
    """
    out = _shallow(doc)
    parent = out
    for p in path[:-1]:
        child = _shallow(parent[p])
        parent[p] = child
        parent = child
    if delete:
        del parent[path[-1]]
    else:
        parent[path[-1]] = value
    return out


def _shallow(node: Any) -> Any:
    return dict(node) if isinstance(node, dict) else list(node)


def _local_ref(schema: Any, node: Any) -> Path | None:
    """Path of the subschema a local `$ref` ("#/a/b") in `node` points at, if it resolves."""
    ref = node.get("$ref") if isinstance(node, dict) else None
    if not isinstance(ref, str) or not ref.startswith("#"):
        return None
    fragment = unquote(ref[1:])
    if not fragment:
        return ()
    if not fragment.startswith("/"):
        return None  # a named anchor, not a pointer
    path: list[str | int] = []
    doc = schema
    for raw in fragment[1:].split("/"):
        part = raw.replace("~1", "/").replace("~0", "~")
        if isinstance(doc, dict) and part in doc:
            path.append(part)
            doc = doc[part]
        elif isinstance(doc, list) and part.isdigit() and int(part) < len(doc):
            path.append(int(part))
            doc = doc[int(part)]
        else:
            return None
    return tuple(path)


def _pointer(path: Path) -> str:
    return "".join("/" + str(p).replace("~", "~0").replace("/", "~1") for p in path)


def locate_schema_error(
    schema: Any,
    message: str,
    error_of: Callable[[Any], str],
    *,
    budget: int = 256,
) -> str:
    """JSON pointer to where `message` comes from in `schema` ("" = the root).

    `error_of(schema)` returns llguidance's error for a schema ("" if valid).
    """
    if not isinstance(schema, dict):
        return ""  # a boolean schema: the root is all there is
    path: Path = ()
    calls = 0
    followed: set[Path] = set()
    while calls < budget:
        descended = False
        for rel in _children(_get(schema, path)):
            calls += 1
            if error_of(_replaced(schema, path + rel, {})) != message:
                path += rel
                descended = True
                break
            if calls >= budget:
                break
        if descended:
            continue
        target = _local_ref(schema, _get(schema, path))
        if not target or target in followed or calls >= budget:
            break  # the root ("#") is never replaced: it is the whole schema
        followed.add(target)
        calls += 1
        if error_of(_replaced(schema, target, {})) == message:
            break
        path = target
    node = _get(schema, path)
    if isinstance(node, dict):
        # "type" last: dropping it silences most errors (an integer with
        # minimum > maximum is fine once it may be anything), so it is only
        # the answer when nothing more specific is.
        keys = sorted(node, key=lambda k: k == "type")
        for key in keys:
            if calls >= budget:
                break
            calls += 1
            if error_of(_replaced(schema, path + (key,), delete=True)) != message:
                return _pointer(path + (key,))
    return _pointer(path)
