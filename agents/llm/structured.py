"""Structured output: check a final answer against the request's `response_format`.

`json_schema` answers must be JSON matching the schema (JSON Schema, draft 2020-12 unless
the schema's `$schema` names another, validated by the `jsonschema` library);
`json_object` answers must be a JSON object; `text` is not checked.

The schema comes from whoever may publish requests, so it is treated as hostile:

* `pattern` is matched with RE2 (linear time, as the security agent's policy patterns),
  not Python's backtracking `re` — a schema cannot stall the worker's event loop on a
  crafted answer. `patternProperties` is refused (jsonschema matches it with `re` in
  several keywords; OpenAI's structured outputs do not take it either).
* `$ref` resolves inside the schema only: the validator gets an empty `referencing`
  registry, which retrieves nothing, so a remote `$ref` is an unresolvable reference.
  (Without one, jsonschema 4.x still fetches remote `$ref`s with urllib — a request
  could make the worker connect anywhere, and hang on a server that never answers.)
* Nesting and size are bounded by the event schema (`schemas.llm.ResponseFormat`), the
  answer's nesting here.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import orjson
import re2
from jsonschema import exceptions, validators
from referencing import Registry
from referencing.exceptions import Unresolvable

from agentstream.schemas.llm import ResponseFormat
from agentstream.streams.errors import ProviderRequestError

#: deepest answer checked; deeper JSON is reported invalid rather than recursed into
MAX_ANSWER_DEPTH = 64


class InvalidResponseFormat(ProviderRequestError):
    """The request's `response_format` schema cannot be used (no provider is called)."""


@dataclass(frozen=True, slots=True)
class Verdict:
    valid: bool
    error: str = ""


def _re2_pattern(validator: Any, pattern: str, instance: Any, schema: Any) -> Iterator[Any]:
    if validator.is_type(instance, "string") and not _compiled(pattern).search(instance):
        yield exceptions.ValidationError(f"{instance[:80]!r} does not match {pattern!r}")


@lru_cache(maxsize=256)
def _compiled(pattern: str) -> Any:
    return re2.compile(pattern)


def _walk(node: Any) -> Iterator[tuple[str, Any]]:
    stack = [node]
    while stack:
        cur = stack.pop()
        if isinstance(cur, dict):
            for k, v in cur.items():
                yield k, v
                stack.append(v)
        elif isinstance(cur, list):
            stack.extend(cur)


@lru_cache(maxsize=128)
def _validator(schema_json: bytes) -> Any:
    schema = orjson.loads(schema_json)
    for key, value in _walk(schema):
        if key == "patternProperties":
            raise InvalidResponseFormat(
                "response_format: patternProperties is not supported (use properties)"
            )
        if key == "pattern" and isinstance(value, str):
            try:
                _compiled(value)
            except re2.error as exc:
                raise InvalidResponseFormat(
                    f"response_format: pattern {value[:80]!r} is not RE2 syntax: {exc}"
                ) from None
    base = validators.validator_for(schema, default=validators.Draft202012Validator)
    try:
        base.check_schema(schema)
    except exceptions.SchemaError as exc:
        raise InvalidResponseFormat(
            f"response_format: not a valid JSON Schema: {_where(exc)}{exc.message[:300]}"
        ) from None
    cls = validators.extend(base, {"pattern": _re2_pattern})
    return cls(schema, registry=Registry())


def prepare(fmt: ResponseFormat | None) -> Any:
    """The checker of a response format (cached per schema), or None when the answer is
    not checked. Raises `InvalidResponseFormat` for a schema that cannot be used."""
    if fmt is None or fmt.type != "json_schema" or fmt.json_schema is None:
        return None
    return _validator(orjson.dumps(fmt.json_schema["schema"], option=orjson.OPT_SORT_KEYS))


def check(fmt: ResponseFormat | None, content: str) -> Verdict | None:
    """Does `content` satisfy `fmt`? None when there is nothing to check (`text`)."""
    if fmt is None or fmt.type == "text":
        return None
    try:
        value = orjson.loads(content)
    except orjson.JSONDecodeError as exc:
        return Verdict(False, f"not JSON: {exc}"[:500])
    if _depth_over(value, MAX_ANSWER_DEPTH):
        return Verdict(False, f"nested deeper than {MAX_ANSWER_DEPTH} levels")
    if fmt.type == "json_object":
        return Verdict(True) if isinstance(value, dict) else Verdict(False, "not a JSON object")
    validator = prepare(fmt)
    try:
        error = exceptions.best_match(validator.iter_errors(value))
    except Unresolvable as exc:
        return Verdict(False, f"schema reference cannot be resolved: {exc}"[:500])
    if error is None:
        return Verdict(True)
    return Verdict(False, f"{_where(error)}{error.message}"[:500])


def _where(error: Any) -> str:
    path = "/".join(str(p) for p in error.absolute_path)
    return f"at /{path}: " if path else ""


def _depth_over(value: Any, limit: int) -> bool:
    stack = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict | list):
            if depth > limit:
                return True
            children = node.values() if isinstance(node, dict) else node
            stack.extend((c, depth + 1) for c in children)
    return False
