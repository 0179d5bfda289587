"""Port of SGLang's JSON decode program: a city described as JSON under a schema."""

from __future__ import annotations

from typing import Any

from dendrite.program import gen, program

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "pattern": "^[A-Z][a-z]{0,5}$"},
        "country": {"enum": ["France", "Japan", "Peru"]},
    },
    "required": ["name", "country"],
    "additionalProperties": False,
    # llguidance's compile options: compact JSON, so 32 tokens hold the whole object
    "x-guidance": {"whitespace_flexible": False},
}


@program
def city_json(s, city: str):
    s += f"Describe {city} as a JSON object with its name and country.\n"
    s += gen("json", max_tokens=32, temperature=0, json_schema=SCHEMA)
    return s["json"]


def main(engine: Any) -> str:
    return city_json.run(engine, city="Paris", seed=0).value
