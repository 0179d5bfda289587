"""JSON schemas shared by the grammar tests: one per feature the issue names."""

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "email": {"type": "string", "pattern": "^[a-z]{1,8}@[a-z]{1,6}\\.(com|org)$"},
    },
    "required": ["name", "age"],
    "additionalProperties": False,
}

COLORS = {
    "type": "array",
    "items": {"enum": ["red", "green", "blue"]},
    "minItems": 1,
    "maxItems": 4,
}

NESTED = {
    "type": "object",
    "properties": {
        "user": {
            "type": "object",
            "properties": {
                "id": {"type": "integer", "minimum": 1},
                "tags": {
                    "type": "array",
                    "items": {"type": "string", "maxLength": 6},
                    "maxItems": 3,
                },
                "address": {
                    "type": "object",
                    "properties": {
                        "city": {"type": "string", "maxLength": 8},
                        "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
                    },
                    "required": ["zip"],
                    "additionalProperties": False,
                },
            },
            "required": ["id", "address"],
            "additionalProperties": False,
        },
        "active": {"type": "boolean"},
    },
    "required": ["user", "active"],
    "additionalProperties": False,
}

BOUNDED = {
    "type": "object",
    "properties": {
        "x": {"type": "number", "minimum": -1.5, "maximum": 2.25},
        "y": {"type": "integer", "exclusiveMinimum": 0, "exclusiveMaximum": 10},
        "z": {"type": "integer", "minimum": -20, "maximum": -3},
        "p": {"type": "number", "minimum": 0, "exclusiveMaximum": 1},
    },
    "required": ["x", "y", "z", "p"],
    "additionalProperties": False,
}

ENUM_MIXED = {"enum": ["red", "green", 3, None, True, 'a "quoted" one']}

CODE = {"type": "string", "pattern": "^[A-Z]{2}-[0-9]{3}$"}

OPTIONAL = {
    "type": "object",
    "properties": {
        "a": {"type": "integer"},
        "b": {"type": "string", "maxLength": 4},
        "c": {"type": "array", "items": {"type": "boolean"}, "maxItems": 3},
        "d": {"type": "null"},
    },
    "additionalProperties": False,
}

UNION = {
    "type": "object",
    "properties": {
        "v": {
            "anyOf": [
                {"type": "integer", "minimum": 0, "maximum": 99},
                {"type": "string", "maxLength": 5},
                {"type": "null"},
            ]
        },
        "k": {"const": "fixed"},
    },
    "required": ["v", "k"],
    "additionalProperties": False,
}

TREE = {
    "$defs": {
        "node": {
            "type": "object",
            "properties": {
                "v": {"type": "integer", "minimum": 0, "maximum": 9},
                "kids": {"type": "array", "items": {"$ref": "#/$defs/node"}, "maxItems": 2},
            },
            "required": ["v"],
            "additionalProperties": False,
        }
    },
    "$ref": "#/$defs/node",
}

POINTS = {
    "type": "array",
    "items": {
        "type": "object",
        "properties": {
            "x": {"type": "integer"},
            "y": {"type": "integer"},
            "label": {"enum": ["a", "b"]},
        },
        "required": ["x", "y"],
        "additionalProperties": False,
    },
    "maxItems": 3,
}

OPEN_OBJECT = {
    # additionalProperties left open: extra keys with any JSON value allowed.
    "type": "object",
    "properties": {"id": {"type": "integer"}},
    "required": ["id"],
    "maxProperties": 3,
}

STRINGS = {
    "type": "object",
    "properties": {
        "s": {"type": "string", "minLength": 2, "maxLength": 6},
        "t": {"type": "string", "pattern": "^(ab|cd)+$"},
    },
    "required": ["s", "t"],
    "additionalProperties": False,
}
