"""JSON-schema constrained generation over random logits: every complete output validates.

Over 1000 generations across objects, arrays, enums, nested objects, bounded
numbers, string patterns, required/optional fields, refs and unions. Each
complete output must parse and validate with `jsonschema`; incomplete ones
must have been cut by max_tokens.
"""

from __future__ import annotations

import json
import zlib

import jsonschema
import pytest
from grammar_schemas import (
    BOUNDED,
    CODE,
    COLORS,
    ENUM_MIXED,
    NESTED,
    OPEN_OBJECT,
    OPTIONAL,
    PERSON,
    POINTS,
    STRINGS,
    TREE,
    UNION,
)

from dendrite.grammar import Constraint

# (name, schema, json_options, count, closing bias). Compact whitespace for
# some, llguidance's default flexible whitespace for others; a weaker bias
# where a strong one would make outputs trivial (a tree of one node).
CASES = [
    ("person", PERSON, None, 100, 1.0),
    ("colors", COLORS, None, 100, 1.0),
    ("nested", NESTED, {"whitespace_flexible": False}, 100, 2.0),
    ("bounded", BOUNDED, None, 100, 2.0),
    ("enum_mixed", ENUM_MIXED, None, 80, 0.0),
    ("code", CODE, None, 80, 0.0),
    ("optional", OPTIONAL, {"whitespace_flexible": False}, 100, 1.0),
    ("union", UNION, None, 100, 2.0),
    ("tree", TREE, {"whitespace_flexible": False}, 100, 0.3),
    ("points", POINTS, {"whitespace_flexible": False}, 100, 1.0),
    ("open_object", OPEN_OBJECT, {"whitespace_flexible": False}, 100, 2.0),
    ("strings", STRINGS, None, 100, 2.0),
]
TOTALS = {"cases": 0, "generations": 0, "complete": 0}


@pytest.mark.parametrize("name,schema,options,count,bias", CASES, ids=[c[0] for c in CASES])
def test_schema_outputs_validate(sample, gtok, name, schema, options, count, bias):
    jsonschema.Draft202012Validator.check_schema(schema)
    validator = jsonschema.Draft202012Validator(schema)
    c = Constraint(json_schema=schema, json_options=options)
    gens = sample(c, count, seed=zlib.crc32(name.encode()), max_tokens=160, bias_strength=bias)
    complete = 0
    for g in gens:
        text = gtok.decode(g.tokens)
        if g.status == "complete":
            complete += 1
            value = json.loads(text)
            errors = list(validator.iter_errors(value))
            assert not errors, f"{name}: {text!r}: {errors[0].message}"
        else:
            # Only a max_tokens cut may leave a generation incomplete.
            assert g.finish == "length", (name, text, g.finish)
    TOTALS["cases"] += 1
    TOTALS["generations"] += len(gens)
    TOTALS["complete"] += complete
    # Most generations must finish, or the test proves little.
    assert complete >= 0.8 * count, f"{name}: only {complete}/{count} complete"


def test_over_1000_complete_generations():
    """Runs after the cases above (file order): the issue's 1000-generation bar."""
    if TOTALS["cases"] != len(CASES):
        pytest.skip("needs every schema case in this session")
    assert TOTALS["complete"] >= 1000, TOTALS


def test_max_tokens_cut_is_incomplete(sample, gtok):
    """A cut JSON object is flagged incomplete (and indeed not valid JSON)."""
    c = Constraint(json_schema=NESTED, json_options={"whitespace_flexible": False})
    gens = sample(c, 40, seed=7, max_tokens=12, bias_strength=2.0)
    for g in gens:
        assert g.finish == "length" and g.status == "incomplete"
        with pytest.raises(json.JSONDecodeError):
            json.loads(gtok.decode(g.tokens))


def test_forced_prefix_is_appended_without_sampling(gtok):
    """Required keys in a compact schema are forced: no sampling needed."""
    c = Constraint(json_schema=NESTED, json_options={"whitespace_flexible": False})
    m = c.matcher(gtok)
    ff = m.forced_tokens()
    assert gtok.decode(ff) == '{"user":{"id":'
    m.consume_many(ff)
    assert m.num_tokens == len(ff) and not m.is_accepting()
