"""A deterministic JSON value that matches a JSON Schema, for the offline provider.

`local` answers a request with a `response_format` schema with such a value, and a tool
call with arguments built the same way from the tool's `parameters`, so an agent loop
(call a tool, send its result back, read a structured answer) runs end to end with no
model, no network and no keys — and the same request always gets the same answer.

What it covers is what function and response schemas use: `type` (one or a list),
`enum`, `const`, `default` and `examples`, `properties` with `required`,
`additionalProperties`, `items` / `prefixItems` with `minItems`, string `minLength` /
`maxLength` / common `format`s, number bounds and `multipleOf`, `anyOf` / `oneOf` (the
first branch), `allOf` (merged), and `$ref` inside the schema (`#/$defs/...`,
`#/definitions/...`, `#`). A `pattern` cannot be satisfied in general: the value may
not match it, and the final response then says `schema_valid: false`, as it would for
a model that got it wrong. Recursion through `$ref` and nesting are bounded (`MAX_DEPTH`).

The schema is the sender's, so the value's size is bounded too: a schema asking for more
than `MAX_ITEMS` items in an array, `MAX_STRING` characters in a string, or more than
`MAX_VALUES` values / `MAX_CHARS` characters / `MAX_STEPS` steps of work in all is refused
(`ExampleTooLarge`) as soon as that is known, never built on the event loop.
"""

from __future__ import annotations

import hashlib
import math
import random
from typing import Any

#: below this depth optional properties are left out (arrays stop at their minItems at
#: half of it); required parts go on to twice it, where a chain that never ends is cut
MAX_DEPTH = 12
#: the most items one array may need (`minItems`), characters one string (`minLength`)
MAX_ITEMS = 10_000
MAX_STRING = 100_000
#: the most values, and characters of strings, one example may hold in all (nested
#: arrays multiply: 900 items of 900 items is 810,000 values)
MAX_VALUES = 100_000
MAX_CHARS = 1_000_000
#: steps one example may take in all: a value, a `$ref` followed, an `allOf` part
#: merged each count one (an item schema of 4,900 allOf parts, 10,000 times, was 12 s
#: of the event loop within the value limits)
MAX_STEPS = 1_000_000
#: the JSON Schema types a value is built for (`type` is the sender's: never a method name)
_KINDS = frozenset({"object", "array", "string", "integer", "number", "boolean", "null"})


class ExampleTooLarge(ValueError):
    """The schema asks for a value larger than the offline provider builds."""


_FORMATS = {
    "date-time": "2026-01-01T00:00:00Z",
    "date": "2026-01-01",
    "time": "00:00:00Z",
    "email": "agent@example.com",
    "uri": "https://example.com/",
    "url": "https://example.com/",
    "uuid": "00000000-0000-4000-8000-000000000000",
    "hostname": "example.com",
    "ipv4": "192.0.2.1",
    "ipv6": "2001:db8::1",
}


def example(schema: Any, seed: str, words: list[str] | None = None) -> Any:
    """A value matching `schema` (see the module docstring), the same for the same
    `seed`; strings are drawn from `words` (e.g. the prompt's) when given."""
    rng = random.Random(int.from_bytes(hashlib.sha256(seed.encode()).digest()[:8], "big"))
    return _Builder(schema, rng, [w for w in words or () if w] or ["value"]).value(schema, 0)


class _Builder:
    def __init__(self, root: Any, rng: random.Random, words: list[str]) -> None:
        self.root = root
        self.rng = rng
        self.words = words
        self.values_left = MAX_VALUES
        self.chars_left = MAX_CHARS
        self.steps_left = MAX_STEPS

    def value(self, schema: Any, depth: int) -> Any:
        if depth > 2 * MAX_DEPTH:  # a chain of required parts with no end
            return None
        self.values_left -= 1
        if self.values_left < 0:
            raise ExampleTooLarge(f"the schema's value is too large: over {MAX_VALUES} values")
        self.step()
        if schema is True or not isinstance(schema, dict):
            return None if schema is False else self.word()
        schema = self.resolve(schema, depth)
        if "const" in schema:
            return schema["const"]
        if isinstance(schema.get("enum"), list) and schema["enum"]:
            return schema["enum"][self.rng.randrange(len(schema["enum"]))]
        if "default" in schema:
            return schema["default"]
        if isinstance(schema.get("examples"), list) and schema["examples"]:
            return schema["examples"][0]
        for key in ("anyOf", "oneOf"):
            branches = schema.get(key)
            if isinstance(branches, list) and branches:
                return self.value(branches[0], depth + 1)
        if isinstance(schema.get("allOf"), list):
            merged: dict[str, Any] = {k: v for k, v in schema.items() if k != "allOf"}
            self.step(len(schema["allOf"]))
            for part in schema["allOf"]:
                part = self.resolve(part, depth) if isinstance(part, dict) else {}
                self.step(len(part))
                for k, v in part.items():
                    if k == "properties" and isinstance(v, dict):
                        self.step(len(v))
                        merged["properties"] = {**merged.get("properties", {}), **v}
                    elif k == "required" and isinstance(v, list):
                        merged["required"] = [*merged.get("required", []), *v]
                    else:
                        merged.setdefault(k, v)
            return self.value(merged, depth + 1)
        kind = schema.get("type")
        if isinstance(kind, list):
            kinds = [k for k in kind if k != "null"] or kind
            kind = kinds[0] if kinds else None
        if kind is None:
            kind = "object" if "properties" in schema else "string"
            kind = "array" if "items" in schema or "prefixItems" in schema else kind
        if not isinstance(kind, str) or kind not in _KINDS:
            return None
        build = getattr(self, f"_{kind}", None)
        return build(schema, depth) if build is not None else None

    def resolve(self, schema: dict[str, Any], depth: int) -> dict[str, Any]:
        seen = 0
        while isinstance(schema.get("$ref"), str) and seen < MAX_DEPTH:
            self.step()
            target = self.pointer(schema["$ref"])
            if not isinstance(target, dict):
                return {}
            rest = {k: v for k, v in schema.items() if k != "$ref"}
            schema = {**target, **rest}
            seen += 1
        return schema

    def pointer(self, ref: str) -> Any:
        if not ref.startswith("#"):
            return None  # only references inside the schema (structured.py refuses others)
        node: Any = self.root
        for part in filter(None, ref[1:].split("/")):
            part = part.replace("~1", "/").replace("~0", "~")
            if isinstance(node, dict) and part in node:
                node = node[part]
            elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
                node = node[int(part)]
            else:
                return None
        return node

    def step(self, n: int = 1) -> None:
        self.steps_left -= n
        if self.steps_left < 0:
            raise ExampleTooLarge(
                f"the schema's value is too large to build: over {MAX_STEPS} steps"
            )

    def word(self) -> str:
        return self.words[self.rng.randrange(len(self.words))]

    def _object(self, schema: dict[str, Any], depth: int) -> dict[str, Any]:
        given = schema.get("properties")
        props: dict[str, Any] = given if isinstance(given, dict) else {}
        required = [r for r in schema.get("required") or () if isinstance(r, str)]
        self.step(len(props) + len(required))
        required_set = set(required)
        out: dict[str, Any] = {}
        for name, sub in props.items():
            if depth < MAX_DEPTH or name in required_set:
                out[name] = self.value(sub, depth + 1)
        extra = schema.get("additionalProperties", True)
        for name in required:
            if name not in out:
                out[name] = self.value(extra if isinstance(extra, dict) else {}, depth + 1)
        return out

    def _array(self, schema: dict[str, Any], depth: int) -> list[Any]:
        given = schema.get("prefixItems")
        prefix: list[Any] = given if isinstance(given, list) else []
        items = schema.get("items", {})
        low = max(_count(schema, "minItems"), len(prefix))
        high = schema.get("maxItems")
        n = low if depth >= MAX_DEPTH // 2 else max(low, 1)
        if isinstance(high, int):
            n = min(n, high)
        if n > min(MAX_ITEMS, self.values_left):
            raise ExampleTooLarge(
                f"the schema's value is too large: an array of {n} items (at most "
                f"{MAX_ITEMS}, and {MAX_VALUES} values in all)"
            )
        out = [self.value(prefix[i], depth + 1) for i in range(min(n, len(prefix)))]
        while len(out) < n:
            out.append(self.value(items if isinstance(items, dict) else {}, depth + 1))
        return out

    def _string(self, schema: dict[str, Any], depth: int) -> str:
        fmt = schema.get("format")
        text = _FORMATS.get(fmt) if isinstance(fmt, str) else None
        if text is None:  # a few words in a row, as a phrase of the prompt
            start = self.rng.randrange(len(self.words))
            text = " ".join(self.words[start : start + self.rng.randint(1, 3)])
        low = _count(schema, "minLength")
        high = schema.get("maxLength")
        if low > min(MAX_STRING, self.chars_left):
            raise ExampleTooLarge(
                f"the schema's value is too large: a string of {low} characters (at most "
                f"{MAX_STRING}, and {MAX_CHARS} in all)"
            )
        while len(text) < low:
            text += " " + self.word()
        if isinstance(high, int) and len(text) > high:
            text = text[:high]
        self.chars_left -= len(text)
        return text

    def _integer(self, schema: dict[str, Any], depth: int) -> int:
        low, high = _bounds(schema, integer=True)
        value = _multiple(schema, low, high, self.rng)
        if value is not None and float(value).is_integer():
            return int(value)
        return self.rng.randint(low, high) if low <= high else low

    def _number(self, schema: dict[str, Any], depth: int) -> float | int:
        low, high = _bounds(schema, integer=False)
        value = _multiple(schema, low, high, self.rng)
        if value is not None:
            return value
        return round(low + (high - low) * self.rng.random(), 3) if high > low else low

    def _boolean(self, schema: dict[str, Any], depth: int) -> bool:
        return self.rng.random() < 0.5

    def _null(self, schema: dict[str, Any], depth: int) -> None:
        return None


def _multiple(schema: dict[str, Any], low: Any, high: Any, rng: random.Random) -> Any:
    """A multiple of `multipleOf` within [low, high] that a validator accepts (float
    steps: k * step / step must come out whole), or None."""
    step = schema.get("multipleOf")
    if not isinstance(step, (int, float)) or isinstance(step, bool) or step <= 0:
        return None
    if low <= 0 <= high:
        return 0
    first = math.ceil(low / step)
    for k in range(first, first + 16):
        value = k * step
        if value > high:
            break
        if isinstance(step, int) or (value / step).is_integer():
            return value
    return None


def _bounds(schema: dict[str, Any], *, integer: bool) -> tuple[Any, Any]:
    low: Any = schema.get("minimum", 0 if "maximum" not in schema else None)
    high: Any = schema.get("maximum")
    ex_low, ex_high = schema.get("exclusiveMinimum"), schema.get("exclusiveMaximum")
    tick = 1 if integer else 1e-3
    if isinstance(ex_low, (int, float)) and not isinstance(ex_low, bool):
        low = ex_low + tick if low is None else max(low, ex_low + tick)
    if isinstance(ex_high, (int, float)) and not isinstance(ex_high, bool):
        high = ex_high - tick if high is None else min(high, ex_high - tick)
    if low is None:
        low = high - 100 if high is not None else 0
    if high is None:
        high = low + 100
    if integer:
        low, high = math.ceil(low), math.floor(high)
    return low, high


def _count(schema: dict[str, Any], key: str) -> int:
    """A `minItems` / `minLength` as a count: what is no number counts as 0 (the
    structured-output check refuses such a schema for a model; here it builds nothing)."""
    value = schema.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        return 0
    return int(min(value, 2**62))
