"""JSON schemas of varied shape for the constrained-decoding tests (bounded, so that a random model, which picks
any allowed token, still finishes within a few dozen tokens)."""

from __future__ import annotations

NAME = {"type": "string", "pattern": "^[A-Z][a-z]{1,6}$"}

SCHEMAS = {
    "flat_object": {
        "type": "object",
        "properties": {"name": NAME, "age": {"type": "integer", "minimum": 0, "maximum": 120}},
        "required": ["name", "age"],
        "additionalProperties": False,
    },
    "nested_object": {
        "type": "object",
        "properties": {
            "user": {"type": "object", "properties": {"id": {"type": "integer", "minimum": 1, "maximum": 999},
                                                      "admin": {"type": "boolean"}},
                     "required": ["id", "admin"], "additionalProperties": False},
            "active": {"type": "boolean"},
        },
        "required": ["user", "active"],
        "additionalProperties": False,
    },
    "array_bounds": {
        "type": "array",
        "items": {"type": "integer", "minimum": -9, "maximum": 9},
        "minItems": 2,
        "maxItems": 4,
    },
    "enum": {
        "type": "object",
        "properties": {"color": {"enum": ["red", "green", "blue"]}, "size": {"const": "large"}},
        "required": ["color", "size"],
        "additionalProperties": False,
    },
    "bounded_number": {
        "type": "object",
        "properties": {"ratio": {"type": "number", "minimum": 0, "maximum": 1},
                       "count": {"type": "integer", "exclusiveMinimum": 10, "maximum": 20}},
        "required": ["ratio", "count"],
        "additionalProperties": False,
    },
    "string_pattern": {
        "type": "object",
        "properties": {"code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{2}$"},
                       "tag": {"type": "string", "minLength": 1, "maxLength": 4}},
        "required": ["code", "tag"],
        "additionalProperties": False,
    },
    "any_of": {
        "type": "object",
        "properties": {"value": {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 99}, {"type": "boolean"},
                                           {"type": "null"}]}},
        "required": ["value"],
        "additionalProperties": False,
    },
    "ref_defs": {
        "$defs": {"point": {"type": "object",
                            "properties": {"x": {"type": "integer", "minimum": 0, "maximum": 9},
                                           "y": {"type": "integer", "minimum": 0, "maximum": 9}},
                            "required": ["x", "y"], "additionalProperties": False}},
        "type": "object",
        "properties": {"start": {"$ref": "#/$defs/point"}, "end": {"$ref": "#/$defs/point"}},
        "required": ["start", "end"],
        "additionalProperties": False,
    },
    "optional_fields": {
        "type": "object",
        "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 9}, "note": {"enum": ["a", "b"]},
                       "flag": {"type": "boolean"}},
        "required": ["id"],
        "additionalProperties": False,
    },
    "array_of_objects": {
        "type": "array",
        "items": {"type": "object", "properties": {"k": {"enum": ["p", "q"]}, "v": {"type": "boolean"}},
                  "required": ["k", "v"], "additionalProperties": False},
        "minItems": 1,
        "maxItems": 2,
    },
}
