"""`agents.llm.examples`: the offline provider's schema-matching values, checked by the
same validator the worker checks structured answers with (`agents.llm.structured`)."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from agentstream.agents.llm import structured
from agentstream.agents.llm.examples import MAX_DEPTH, example
from agentstream.schemas.llm import ResponseFormat

WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "minLength": 2},
        "days": {"type": "integer", "minimum": 1, "maximum": 14},
        "units": {"type": "string", "enum": ["celsius", "fahrenheit"]},
    },
    "required": ["city", "days"],
    "additionalProperties": False,
}

SCHEMAS: dict[str, dict[str, Any]] = {
    "weather": WEATHER,
    "nested refs": {
        "type": "object",
        "$defs": {
            "person": {
                "type": "object",
                "properties": {"name": {"type": "string"}, "email": {"format": "email"}},
                "required": ["name", "email"],
            }
        },
        "properties": {
            "owner": {"$ref": "#/$defs/person"},
            "team": {"type": "array", "items": {"$ref": "#/$defs/person"}, "minItems": 2},
        },
        "required": ["owner", "team"],
    },
    "draft-07 definitions": {
        "$schema": "http://json-schema.org/draft-07/schema#",
        "definitions": {"id": {"type": "string", "format": "uuid"}},
        "type": "object",
        "properties": {"ids": {"type": "array", "items": {"$ref": "#/definitions/id"}}},
        "required": ["ids"],
    },
    "numbers": {
        "type": "object",
        "properties": {
            "ratio": {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1},
            "step": {"type": "number", "multipleOf": 0.25, "minimum": 3.1, "maximum": 9},
            "tenth": {"type": "number", "multipleOf": 0.1, "minimum": 0.35},
            "even": {"type": "integer", "multipleOf": 2, "minimum": 7, "maximum": 11},
            "neg": {"type": "integer", "maximum": -5},
        },
        "required": ["ratio", "step", "tenth", "even", "neg"],
    },
    "strings": {
        "type": "object",
        "properties": {
            "short": {"type": "string", "maxLength": 3},
            "long": {"type": "string", "minLength": 40},
            "when": {"type": "string", "format": "date-time"},
            "site": {"type": "string", "format": "uri"},
        },
        "required": ["short", "long", "when", "site"],
    },
    "combinators": {
        "type": "object",
        "properties": {
            "either": {"anyOf": [{"type": "integer", "minimum": 3}, {"type": "string"}]},
            "one": {"oneOf": [{"const": "x"}, {"type": "boolean"}]},
            "both": {
                "allOf": [
                    {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]},
                    {"properties": {"b": {"type": "boolean"}}, "required": ["b"]},
                ]
            },
            "maybe": {"type": ["null", "string"]},
            "fixed": {"const": 42},
            "given": {"type": "integer", "default": 7},
        },
        "required": ["either", "one", "both", "maybe", "fixed", "given"],
    },
    "tuples": {
        "type": "array",
        "prefixItems": [{"type": "string"}, {"type": "integer"}, {"type": "boolean"}],
        "minItems": 3,
        "maxItems": 3,
    },
    "recursive tree": {
        "$defs": {
            "node": {
                "type": "object",
                "properties": {
                    "label": {"type": "string"},
                    "children": {"type": "array", "items": {"$ref": "#/$defs/node"}},
                },
                "required": ["label", "children"],
            }
        },
        "$ref": "#/$defs/node",
    },
    "required without properties": {
        "type": "object",
        "required": ["anything"],
        "additionalProperties": {"type": "integer"},
    },
}


def _valid(schema: dict[str, Any], value: Any) -> structured.Verdict | None:
    fmt = ResponseFormat(type="json_schema", json_schema={"name": "t", "schema": schema})
    return structured.check(fmt, orjson.dumps(value).decode())


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_the_value_matches_its_schema(name: str) -> None:
    schema = SCHEMAS[name]
    for seed in ("a", "b", "c", "a longer seed"):
        value = example(schema, seed, ["paris", "weather", "tomorrow"])
        verdict = _valid(schema, value)
        assert verdict is not None and verdict.valid, (name, seed, value, verdict)


def test_the_same_seed_gives_the_same_value_and_others_vary() -> None:
    words = ["paris", "rome", "oslo", "lima", "kyiv"]
    first = example(WEATHER, "request-1", words)
    assert example(WEATHER, "request-1", words) == first
    others = {orjson.dumps(example(WEATHER, f"request-{i}", words)) for i in range(20)}
    assert len(others) > 5


def test_strings_are_drawn_from_the_words_given() -> None:
    value = example({"type": "string"}, "s", ["hello"])
    assert set(value.split()) == {"hello"}


def test_a_self_reference_that_requires_itself_stops_at_the_depth_bound() -> None:
    schema = {
        "$defs": {
            "n": {
                "type": "object",
                "properties": {"next": {"$ref": "#/$defs/n"}},
                "required": ["next"],
            }
        },
        "$ref": "#/$defs/n",
    }
    value = example(schema, "deep")
    depth = 0
    while isinstance(value, dict):
        value, depth = value["next"], depth + 1
    assert depth <= 2 * MAX_DEPTH + 2


def test_a_reference_outside_the_schema_is_not_followed() -> None:
    # structured.py resolves nothing outside the schema either; the value is a plain one
    assert example({"$ref": "https://example.com/schema.json"}, "r") is not None


# A request's schema is the sender's: one that asks the offline provider for a value of
# unbounded size must be refused at once, never built on the event loop (a 200-byte
# request that stalled the worker and, replayed after the crash, stalled it again).
HOSTILE_SCHEMAS = {
    "many-items": {"type": "array", "minItems": 1_000_000_000},
    "long-string": {"type": "string", "minLength": 10**12},
    "nested-items": {
        "type": "array",
        "minItems": 900,
        "items": {"type": "array", "minItems": 900, "items": {"type": "string"}},
    },
    "costly-items": {  # few values, but every item re-merges thousands of allOf parts
        "type": "array",
        "minItems": 10_000,
        "items": {"allOf": [{"type": "string"}] * 4900},
    },
    "wide-objects": {  # each item scans 10,000 properties (and a list of required)
        "type": "array",
        "minItems": 1000,
        "items": {
            "type": "object",
            "properties": {f"p{i}": {"const": 1} for i in range(10_000)},
            "required": [f"p{i}" for i in range(0, 10_000, 1000)],
        },
    },
    "wide-required": {
        "type": "object",
        "required": [f"k{i}" for i in range(200)],
        "additionalProperties": {"type": "string", "minLength": 9_000},
    },
}


@pytest.mark.parametrize("schema", HOSTILE_SCHEMAS.values(), ids=HOSTILE_SCHEMAS.keys())
def test_a_value_too_large_to_build_is_refused_quickly(schema: dict[str, Any]) -> None:
    from agentstream.agents.llm.examples import ExampleTooLarge

    with pytest.raises(ExampleTooLarge, match="too large"):  # before: built, or never ended
        example(schema, "seed")


def test_the_local_provider_fails_such_a_request_without_a_retry() -> None:
    import asyncio

    from agentstream.agents.llm.providers.local import LocalProvider
    from agentstream.schemas.llm import ChatMessage, LLMConfig, LLMContext
    from agentstream.streams.errors import ProviderRequestError

    fmt = ResponseFormat.model_validate(
        {
            "type": "json_schema",
            "json_schema": {"name": "r", "schema": HOSTILE_SCHEMAS["many-items"]},
        }
    )
    context = LLMContext(messages=[ChatMessage(role="user", content="list everything")])
    provider = LocalProvider()
    with pytest.raises(ProviderRequestError) as caught:
        asyncio.run(provider.generate(context, LLMConfig(model="m", response_format=fmt)))
    assert not caught.value.retriable


def test_large_but_bounded_values_are_still_built() -> None:
    value = example({"type": "array", "minItems": 1000, "items": {"type": "integer"}}, "s")
    assert isinstance(value, list) and len(value) == 1000
    assert len(example({"type": "string", "minLength": 10_000}, "s")) >= 10_000


@pytest.mark.parametrize("kind", ["_init__", "_class__", "_setattr__", "resolve", {"a": 1}, [{}]])
def test_a_type_is_never_taken_for_a_method_name(kind: Any) -> None:
    # `type` picks the builder method by name: a hostile one must not reach a dunder
    assert example({"type": kind}, "seed") is None
