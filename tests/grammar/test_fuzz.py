"""Fuzzed specs either compile and run or fail with GrammarError; nothing else escapes.

Random JSON schemas (mutations of the valid ones the other tests use: wrong
types, unknown keywords, bad refs, huge numbers, deep nesting, broken text),
random regexes and random lark text. A spec that compiles must give a mask
with something allowed, and a few allowed tokens must be consumable. Any
other exception (TypeError, KeyError, RuntimeError, a Rust panic) fails, and
so would a hang: every example is bounded.
"""

from __future__ import annotations

import copy
import json
import random
from typing import Any

import grammar_schemas
import llguidance
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from dendrite.grammar import Constraint, GrammarError, unpack_bitmask
from dendrite.grammar.emptiness import byte_tokenizer
from dendrite.grammar.matcher import is_limit_error

BASES = [v for k, v in vars(grammar_schemas).items() if k.isupper() and isinstance(v, dict)] + [
    {"type": "string"},
    {"type": "array", "items": {"type": "integer"}},
]

FUZZ = settings(
    max_examples=120,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)

KEYWORDS = [
    "type", "properties", "items", "prefixItems", "required", "enum", "const", "anyOf",
    "oneOf", "allOf", "not", "$ref", "$defs", "definitions", "minimum", "maximum",
    "exclusiveMinimum", "exclusiveMaximum", "multipleOf", "minLength", "maxLength", "pattern",
    "format", "minItems", "maxItems", "uniqueItems", "additionalProperties", "minProperties",
    "maxProperties", "patternProperties", "propertyNames", "contains", "if", "then", "else",
    "x-unknown", "nullable", "default",
]  # fmt: skip
HUGE = [10**30, -(10**30), 1e308, -1e308, 2**63, 2**64 + 1, 1e-300, 0.1, -0.0, 10**400]

json_leaf = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**6), 10**6),
    st.sampled_from(HUGE),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=12),
    st.sampled_from(["strin", "integer", "object", "#", "#/$defs/nope", "#/properties", "a(b"]),
)
json_value = st.recursive(
    json_leaf,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.sampled_from(KEYWORDS), inner, max_size=4)
    ),
    max_leaves=12,
)


def _nodes(doc: Any) -> list[Any]:
    """Every dict and list inside `doc` (the places a mutation can hit)."""
    out, stack = [], [doc]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            out.append(node)
            stack.extend(node.values())
        elif isinstance(node, list):
            out.append(node)
            stack.extend(node)
    return out


@st.composite
def mutated_schemas(draw: st.DrawFn) -> Any:
    schema = copy.deepcopy(draw(st.sampled_from(BASES)))
    for _ in range(draw(st.integers(1, 4))):
        node = draw(st.sampled_from(_nodes(schema)))
        op = draw(st.sampled_from(["set", "delete", "ref", "huge", "nest", "swap"]))
        if isinstance(node, list):
            if node and op != "nest":
                node[draw(st.integers(0, len(node) - 1))] = draw(json_value)
            else:
                node.append(draw(json_value))
        elif op == "set":
            node[draw(st.sampled_from(KEYWORDS))] = draw(json_value)
        elif op == "delete" and node:
            del node[draw(st.sampled_from(sorted(node)))]
        elif op == "ref":
            node["$ref"] = draw(
                st.sampled_from(["#", "#/$defs/node", "#/nope", "#/properties/0", "other.json#"])
                | st.text(max_size=10)
            )
        elif op == "huge":
            node[draw(st.sampled_from(KEYWORDS[14:26]))] = draw(st.sampled_from(HUGE))
        elif op == "nest":
            depth = draw(st.integers(10, 300))
            inner: Any = {"type": "integer"}
            for _ in range(depth):
                inner = {"type": "array", "items": inner}
            node["items"] = inner
        elif op == "swap" and node:
            key = draw(st.sampled_from(sorted(node)))
            node[key] = draw(st.sampled_from([[], {}, "x", 3, None, True, [{}], {"a": 1}]))
    if draw(st.booleans()):
        return schema
    text = json.dumps(schema)
    if draw(st.integers(0, 3)) == 0:  # damage the text itself
        i = draw(st.integers(0, len(text)))
        text = text[:i] + draw(st.sampled_from(["", "}", '"', ",", "{", '"type":1,'])) + text[i:]
    return text


REGEX_ATOMS = list("ab01.") + [
    "(", ")", "[", "]", "[^", "{", "}", "{2}", "{0}", "{1,3}", "{3,1}", "{99999}", "|", "*",
    "+", "?", "^", "$", "\\", "\\d", "\\s", "\\S", "\\w", "\\p{L}", "\\b", "(?i)", "(?:",
    "(?P<n>", "-", "[^\\s\\S]", "é", "\\x{10FFFF}", "\\u0000",
]  # fmt: skip

RULES = ["start", "a", "b", "c"]
ITEMS = [
    "a", "b", "c", "start", "A", "B", '"x"', '"yz"', "/[a-z]{1,3}/", "/[^\\s\\S]/", "NUMBER",
    "<|user|>", '%json {"type": "integer"}', '""',
]  # fmt: skip
GARBAGE = [
    "(", ")", "|", ":", '"', "/(/", "%ignore WS\n", "[lazy]", "~", "&", "->", "{", ".2", "\n",
    "undefined_rule", "<[1]>", "%import common.WS\n", "?", "!",
]  # fmt: skip


@st.composite
def lark_texts(draw: st.DrawFn) -> str:
    """A random grammar over rules a..c and terminals A, B; maybe with some garbage."""

    def seq(depth: int) -> str:
        parts = []
        for _ in range(draw(st.integers(0 if depth else 1, 3))):
            if depth < 2 and draw(st.integers(0, 5)) == 0:
                parts.append(f"({alts(depth + 1)})" + draw(st.sampled_from(["", "*", "+", "?"])))
            else:
                parts.append(draw(st.sampled_from(ITEMS)))
        return " ".join(parts)

    def alts(depth: int) -> str:
        return " | ".join(seq(depth) for _ in range(draw(st.integers(1, 3))))

    lines = [f"{name}: {alts(0)}" for name in RULES[: draw(st.integers(1, 4))]]
    for name in ("A", "B"):
        lines.append(
            f"{name}: "
            + draw(st.sampled_from(['"t"', "/[0-9]+/", '"q" A', "/[^\\s\\S]/", '"p" B?']))
        )
    lines.append("%import common.NUMBER")
    text = "\n".join(lines) + "\n"
    for _ in range(draw(st.integers(0, 2)) if draw(st.booleans()) else 0):
        i = draw(st.integers(0, len(text)))
        text = text[:i] + draw(st.sampled_from(GARBAGE)) + text[i:]
    return text


def _accepts_something(grammar_text: str, max_states: int = 300) -> bool | None:
    """Breadth-first over bytes: does some short string complete the grammar? None: unknown."""
    tok = byte_tokenizer()
    root = llguidance.LLMatcher(tok, grammar_text, log_level=0)
    if root.is_error():
        return None  # e.g. a special token the byte tokenizer lacks
    queue, seen = [root], 0
    while queue and seen < max_states:
        m = queue.pop(0)
        seen += 1
        if m.is_accepting():
            return True
        mask = torch.zeros(1, (tok.vocab_size + 31) // 32, dtype=torch.int32)
        m.unsafe_compute_mask_ptr(mask.data_ptr(), 4 * mask.shape[1])
        for b in unpack_bitmask(mask, 256)[0].nonzero().flatten().tolist():
            child = m.deep_copy()
            if child.consume_token(b):
                queue.append(child)
    return False if not queue else None


def _exercise(gtok, spec: dict[str, Any], rng: random.Random) -> None:
    """Build, compile, mask and consume a few allowed tokens; only GrammarError may escape."""
    c = None
    try:
        c = Constraint(**spec)
        c.compile(gtok)
    except GrammarError as e:
        assert e.kind in ("regex", "json_schema", "grammar", "choices")
        assert str(e).startswith(f"invalid {e.kind}") and "\n" not in str(e), str(e)
        event("GrammarError")
        empty = e.message.startswith("grammar matches no string")
        if c is not None and empty and "tokenizer" not in e.message:
            # Sound either way: a string found means the rejection was wrong.
            assert _accepts_something(c.grammar_text) is not True, (spec, e.message)
            event("matches no string")
        return
    event("compiled")
    m = c.matcher(gtok)
    for _ in range(6):
        allowed = m.allowed_tokens()
        assert allowed, f"compiled, yet nothing allowed: {spec!r}"
        if m.is_error():
            # A resource limit, or a dead end the compile checks cannot see
            # (a JSON schema whose required property recurses forever): the
            # generation can only end, and is reported incomplete.
            limit = is_limit_error(m.error)
            assert limit or m.error.startswith("NoExtension"), (spec, m.error)
            assert set(allowed) <= set(gtok.eos_token_ids)
            event("llguidance limit" if limit else "dead end")
            return
        if m.is_stopped():
            return
        t = rng.choice(allowed)
        m.consume(t)  # an allowed token is never a GrammarViolation
        if t in gtok.eos_token_ids:
            return


@FUZZ
@given(schema=mutated_schemas(), seed=st.integers(0, 2**32 - 1))
def test_fuzzed_json_schemas(gtok, schema, seed):
    _exercise(gtok, {"json_schema": schema}, random.Random(seed))


@FUZZ
@given(
    atoms=st.lists(st.sampled_from(REGEX_ATOMS), max_size=14),
    seed=st.integers(0, 2**32 - 1),
)
def test_fuzzed_regexes(gtok, atoms, seed):
    _exercise(gtok, {"regex": "".join(atoms)}, random.Random(seed))


@FUZZ
@given(text=lark_texts(), seed=st.integers(0, 2**32 - 1))
def test_fuzzed_lark(gtok, text, seed):
    _exercise(gtok, {"grammar": text}, random.Random(seed))


@FUZZ
@given(
    choices=st.lists(st.text(max_size=8), min_size=1, max_size=30),
    seed=st.integers(0, 2**32 - 1),
)
def test_fuzzed_choices(gtok, choices, seed):
    _exercise(gtok, {"choices": choices}, random.Random(seed))
