"""Structured output: the request's `response_format`, on the wire of each provider kind
(against the loopback server) and the final answer checked against it."""

from __future__ import annotations

import re
import socket
import threading
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
from jsonschema import validators
from pydantic import ValidationError

from agentstream.agents.llm import structured
from agentstream.agents.llm.processor import AgentProcessor
from agentstream.agents.llm.registry import LLMRegistry
from agentstream.agents.llm.structured import InvalidResponseFormat, Verdict, check
from agentstream.schemas.llm import (
    ChatMessage,
    LLMConfig,
    LLMContext,
    LLMRequest,
    ResponseFormat,
)
from tests.llm_server import LLMServer, Reply

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "pattern": "^[A-Z]"},
        "age": {"type": "integer", "minimum": 0},
    },
    "required": ["name", "age"],
    "additionalProperties": False,
}


#: a schema nested 40 levels deep
DEEP: Any = []
for _ in range(40):
    DEEP = [DEEP]


def fmt(schema: dict[str, Any] | None = None, **spec: Any) -> ResponseFormat:
    return ResponseFormat(
        type="json_schema", json_schema={"name": "person", "schema": schema or PERSON, **spec}
    )


@pytest.fixture(autouse=True)
def _reset(server: LLMServer) -> Iterator[None]:
    server.reset(Reply())
    structured.clear_cache()  # a survey per test (some count them)
    yield
    structured.clear_cache()


# -- the check ------------------------------------------------------------------------------
def test_an_answer_matching_the_schema_is_valid() -> None:
    assert check(fmt(), '{"name": "Ada", "age": 36}') == Verdict(True)


@pytest.mark.parametrize(
    ("content", "error"),
    [
        ('{"name": "Ada"}', "'age' is a required property"),
        ('{"name": "Ada", "age": -1}', "at /age: -1 is less than the minimum of 0"),
        ('{"name": "ada", "age": 1}', "at /name: 'ada' does not match '^[A-Z]'"),
        ('{"name": "Ada", "age": 1, "x": 0}', "Additional properties are not allowed"),
        ("[1, 2]", "is not of type 'object'"),
        ('```json\n{"name": "Ada", "age": 36}\n```', "not JSON"),  # fenced: not JSON
        ("", "not JSON"),
        ("[" * 100 + "]" * 100, "nested deeper than 64 levels"),
    ],
)
def test_an_answer_not_matching_says_where_and_why(content: str, error: str) -> None:
    verdict = check(fmt(), content)
    assert verdict is not None and not verdict.valid and error in verdict.error


def test_json_object_and_text() -> None:
    obj = ResponseFormat(type="json_object")
    assert check(obj, '{"a": [1]}') == Verdict(True)
    assert check(obj, '"a"') == Verdict(False, "not a JSON object")
    assert check(ResponseFormat(type="text"), "anything") is None
    assert check(None, "anything") is None


def test_a_backtracking_pattern_cannot_stall_the_check() -> None:
    """(a+)+$ takes Python's `re` exponential time on "aaa…!" (this check would not end:
    the suite's per-test timeout fails it); RE2 is linear, and the check's meter counts
    the scan's work (characters times instructions), far inside its budget."""
    evil = fmt({"type": "string", "pattern": "^(a+)+$"})
    verdict = check(evil, '"' + "a" * 5000 + '!"')
    assert verdict is not None and not verdict.valid
    assert verdict.steps < structured.MAX_CHECK_STEPS


@pytest.mark.parametrize(
    ("schema", "error"),
    [
        ({"type": "strnig"}, "not a valid JSON Schema"),
        ({"type": "string", "pattern": "(a)\\1"}, "is not RE2 syntax"),
        ({"type": "object", "patternProperties": {"^x": {}}}, "patternProperties is not supported"),
    ],
)
def test_a_schema_that_cannot_be_used_is_refused(schema: dict[str, Any], error: str) -> None:
    with pytest.raises(InvalidResponseFormat, match=error):
        structured.prepare(fmt(schema))


def test_a_remote_ref_is_refused_and_never_fetched() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(4)
        listener.setblocking(False)
        port = listener.getsockname()[1]
        remote = fmt({"$ref": f"http://127.0.0.1:{port}/schema.json"})
        # in a thread: a survey that did fetch would wait forever on this silent listener
        refusals: list[BaseException] = []

        def attempt() -> None:
            try:
                structured.prepare(remote)
            except InvalidResponseFormat as exc:
                refusals.append(exc)

        worker = threading.Thread(target=attempt)
        worker.daemon = True
        worker.start()
        worker.join(10)
        assert refusals, "the survey tried to fetch the remote $ref (or accepted it)"
        assert "does not resolve inside the schema" in str(refusals[0])
        with pytest.raises(BlockingIOError):
            listener.accept()  # nobody knocked


def test_local_refs_resolve() -> None:
    schema = {
        "$defs": {"age": {"type": "integer", "minimum": 0}},
        "type": "object",
        "properties": {"age": {"$ref": "#/$defs/age"}},
    }
    assert check(fmt(schema), '{"age": 3}') == Verdict(True)
    verdict = check(fmt(schema), '{"age": -3}')
    assert verdict is not None and not verdict.valid


def test_refs_by_anchor_and_by_the_root_id_resolve() -> None:
    schema = {
        "$id": "https://example.com/answer.json",
        "$defs": {"age": {"$anchor": "age", "type": "integer"}},
        "properties": {
            "a": {"$ref": "#age"},
            "b": {"$ref": "https://example.com/answer.json#/$defs/age"},
        },
    }
    assert check(fmt(schema), '{"a": 1, "b": 2}') == Verdict(True)
    verdict = check(fmt(schema), '{"a": 1, "b": "2"}')
    assert verdict is not None and verdict.error == "at /b: '2' is not of type 'integer'"


TREE = {
    "type": "object",
    "properties": {
        "v": {"type": "integer"},
        "children": {"type": "array", "items": {"$ref": "#"}},
    },
    "required": ["v"],
}
ANY_JSON = {
    "$defs": {
        "j": {
            "anyOf": [
                {"type": ["string", "number", "boolean", "null"]},
                {"type": "array", "items": {"$ref": "#/$defs/j"}},
                {"type": "object", "additionalProperties": {"$ref": "#/$defs/j"}},
            ]
        }
    },
    "$ref": "#/$defs/j",
}
BINARY = {"properties": {"v": {"type": "integer"}, "l": {"$ref": "#"}, "r": {"$ref": "#"}}}
LINKED = {
    "type": "object",
    "properties": {"v": {}, "next": {"anyOf": [{"$ref": "#"}, {"type": "null"}]}},
}


def _tree(levels: int, leaf: Any = 1) -> str:
    node: dict[str, Any] = {"v": leaf, "children": []}
    for _ in range(levels):
        node = {"v": 1, "children": [node]}
    return orjson.dumps(node).decode()


@pytest.mark.parametrize(
    ("schema", "good", "bad", "error"),
    [
        (TREE, _tree(31), _tree(31, "x"), "is not of type 'integer'"),
        (ANY_JSON, "[" * 63 + '{"a": 1}' + "]" * 63, "[" * 63 + "{}" * 2 + "]" * 63, "not JSON"),
        (BINARY, '{"l": {"r": {"l": {"v": 2}}}}', '{"l": {"r": {"v": "2"}}}', "at /l/r/v"),
        (LINKED, '{"v": 1, "next": {"v": 2, "next": null}}', '{"next": 3}', "at /next"),
    ],
    ids=["tree", "any-json", "binary-tree", "linked-list"],
)
def test_recursive_schemas_are_accepted_down_to_the_deepest_answer(
    schema: dict[str, Any], good: str, bad: str, error: str
) -> None:
    """A $ref back to an enclosing schema through the answer's children is bounded by the
    answer's depth: recursion is unrolled to it, and a place of the answer gets one
    copy per level — two references per level (left / right, items / properties) apply
    to different children."""
    structured.prepare(fmt(schema))
    assert check(fmt(schema), good) == Verdict(True)
    verdict = check(fmt(schema), bad)
    assert verdict is not None and not verdict.valid and error in verdict.error


def _not_chain(links: int) -> dict[str, Any]:
    """A chain nesting 3 subschemas per link: jsonschema's deepest per subschema."""
    defs = {f"d{i}": {"not": {"not": {"$ref": f"#/$defs/d{i + 1}"}}} for i in range(links)}
    defs[f"d{links}"] = {"type": "integer"}
    return {"$defs": defs, "$ref": "#/$defs/d0"}


def _with_frames(frames: int, call: Any) -> Any:
    return call() if frames == 0 else _with_frames(frames - 1, call)


def test_nesting_is_bounded_below_python_s_recursion_limit() -> None:
    """At the limit, the check runs with 300 frames already on the stack (the worker's
    own are far fewer); one subschema more is refused. Past Python's limit jsonschema
    raised RecursionError — or a PanicException from rpds, which nothing catches."""
    links = (structured.MAX_SCHEMA_NESTING - 2) // 3  # the root and the last one
    at_limit = fmt(_not_chain(links))
    assert _with_frames(300, lambda: check(at_limit, "1")) == Verdict(True)
    verdict = _with_frames(300, lambda: check(at_limit, '"1"'))
    assert verdict is not None and not verdict.valid
    with pytest.raises(InvalidResponseFormat, match="nest more than"):
        structured.prepare(fmt(_not_chain(links + 1)))


@pytest.mark.parametrize(
    ("schema", "error"),
    [
        ({"$schema": "http://json-schema.org/draft-03/schema#"}, "draft-03"),
        ({"$defs": {"a": {"$id": "https://x.example/a", "type": "integer"}}}, "$id"),
        ({"$dynamicRef": "#meta"}, "$dynamicRef is not supported"),
        ({"unevaluatedProperties": False}, "unevaluatedProperties is not supported"),
        ({"unevaluatedItems": False}, "unevaluatedItems is not supported"),
        ({"$ref": "http://["}, "does not resolve"),
        (
            {
                "$schema": "http://json-schema.org/draft-07/schema#",
                "$defs": {"a": {"type": {"a": 1}}},
                "properties": {"x": {"$ref": "#/$defs/a"}},
            },
            "at /$defs/a/type",
        ),
    ],
    ids=[
        "draft-03",
        "inner-id",
        "dynamic-ref",
        "uneval-props",
        "uneval-items",
        "bad-uri",
        "d7-defs",
    ],
)
def test_what_the_survey_cannot_bound_is_refused(schema: dict[str, Any], error: str) -> None:
    with pytest.raises(InvalidResponseFormat, match=re.escape(error)):
        structured.prepare(fmt(schema))


def test_older_drafts_keep_working() -> None:
    draft7 = {
        "$schema": "http://json-schema.org/draft-07/schema#",
        "$defs": {"a": {"type": "integer"}},  # not draft-07's, but jsonschema resolves it
        "properties": {"x": {"$ref": "#/$defs/a"}},
    }
    draft4 = {
        "$schema": "http://json-schema.org/draft-04/schema#",
        "definitions": {"a": {"type": "integer"}},
        "items": [{"$ref": "#/definitions/a"}],
        "additionalItems": False,
    }
    assert check(fmt(draft7), '{"x": 1}') == Verdict(True)
    assert check(fmt(draft4), "[1]") == Verdict(True)
    verdict = check(fmt(draft4), "[1, 2]")
    assert verdict is not None and "Additional items are not allowed" in verdict.error


#: every keyword jsonschema applies that holds no subschema (the survey need not follow it)
ASSERTIONS = {
    "const", "enum", "exclusiveMaximum", "exclusiveMinimum", "format", "maxItems",
    "maxLength", "maxProperties", "maximum", "minItems", "minLength", "minProperties",
    "minimum", "multipleOf", "pattern", "required", "type", "uniqueItems",
    "dependentRequired",
}  # fmt: skip


@pytest.mark.parametrize(
    "cls",
    [
        validators.Draft4Validator,
        validators.Draft6Validator,
        validators.Draft7Validator,
        validators.Draft201909Validator,
        validators.Draft202012Validator,
    ],
)
def test_the_survey_knows_every_keyword_jsonschema_applies(cls: Any) -> None:
    """A keyword holding subschemas that the survey did not follow would let the check's
    work grow unseen (a new jsonschema version may add one)."""
    known = set(structured._APPLICATORS) | set(structured._REFS) | ASSERTIONS
    assert set(cls.VALIDATORS) <= known


def test_a_refused_schema_is_surveyed_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """Refusals are cached like checkers: a sender repeating one costs a lookup."""
    surveys = []
    survey = structured._Survey

    def counted(*args: Any) -> Any:
        surveys.append(1)
        return survey(*args)

    monkeypatch.setattr(structured, "_Survey", counted)
    for _ in range(3):
        with pytest.raises(InvalidResponseFormat, match="refers back to itself"):
            structured.prepare(fmt({"$ref": "#"}))
    assert surveys == [1]


def test_a_large_schema_reusing_its_definitions_is_accepted() -> None:
    """The limits are about work per place of the answer, not the schema's size: 1,000
    properties, 300 of them the same `$ref`, pass the survey and are checked."""
    schema = {
        "$defs": {"id": {"type": "string", "pattern": "^[a-z0-9-]{1,40}$"}},
        "type": "object",
        "properties": {
            **{f"p{i}": {"type": "string", "maxLength": 10} for i in range(700)},
            **{f"r{i}": {"$ref": "#/$defs/id"} for i in range(300)},
        },
        "required": ["r0"],
    }
    answer = {**{f"p{i}": "x" for i in range(700)}, **{f"r{i}": f"id-{i}" for i in range(300)}}
    assert check(fmt(schema), orjson.dumps(answer).decode()) == Verdict(True)
    verdict = check(fmt(schema), orjson.dumps({**answer, "r7": "ID"}).decode())
    assert (
        verdict is not None and verdict.error == "at /r7: 'ID' does not match '^[a-z0-9-]{1,40}$'"
    )


def test_a_large_answer_is_checked_well_within_the_budget() -> None:
    """The budget stops hostile work, not ordinary answers: 5,000 objects of two typed
    properties, closed, are checked to the end (~65,000 steps)."""
    schema = {
        "type": "array",
        "items": {
            "type": "object",
            "properties": {"a": {"type": "integer"}, "b": {"type": "string"}},
            "required": ["a", "b"],
            "additionalProperties": False,
        },
    }
    answer = orjson.dumps([{"a": i, "b": "x"} for i in range(5_000)]).decode()
    verdict = check(fmt(schema), answer)
    assert verdict == Verdict(True)
    assert verdict.steps < structured.MAX_CHECK_STEPS * 3 // 4


# -- the event's own checks -------------------------------------------------------------------
@pytest.mark.parametrize(
    ("value", "error"),
    [
        ({"type": "json_schema"}, "needs json_schema.schema"),
        ({"type": "json_schema", "json_schema": {"schema": []}}, "needs json_schema.schema"),
        ({"type": "json_object", "json_schema": {"schema": {}}}, "json_schema is given with type"),
        (
            {"type": "json_schema", "json_schema": {"schema": {}, "shcema": {}}},
            "unknown key 'shcema'",
        ),
        ({"type": "json_schema", "json_schema": {"schema": {}, "name": "a b"}}, "json_schema.name"),
        ({"type": "json_schema", "json_schema": {"schema": {}, "strict": "yes"}}, "strict"),
        ({"type": "xml"}, "type"),
        (
            {"type": "json_schema", "json_schema": {"schema": {"a": DEEP}}},
            "nested deeper than 32",
        ),
    ],
)
def test_response_format_mistakes_are_refused_in_the_request(
    value: dict[str, Any], error: str
) -> None:
    with pytest.raises(ValidationError, match=error):
        LLMConfig.model_validate({"model": "m", "response_format": value})


# -- on the wire -------------------------------------------------------------------------------
CTX = LLMContext(messages=[ChatMessage(role="user", content="Who?")])


def registry(server: LLMServer) -> LLMRegistry:
    reg = LLMRegistry(secrets=None)
    reg.register_provider("oa", {"kind": "vllm", "base_url": server.url + "/v1"})
    reg.register_provider("ol", {"kind": "ollama", "base_url": server.url})
    return reg


def ask(provider: str, response_format: ResponseFormat, *, stream: bool = True) -> LLMRequest:
    return LLMRequest(
        request_id="r",
        agent_id="a",
        provider=provider,
        stream=stream,
        context=CTX,
        config=LLMConfig(model="m", response_format=response_format),
    )


ADA = ['{"name":', ' "Ada",', ' "age": 36}']


@pytest.mark.parametrize("stream", [True, False])
async def test_openai_compatible_gets_response_format(server: LLMServer, stream: bool) -> None:
    server.script(Reply(words=ADA))
    reg = registry(server)
    out = await AgentProcessor(reg).process_request(ask("oa", fmt(strict=True), stream=stream))
    await reg.aclose()
    assert out.status == "completed" and out.schema_valid is True and out.schema_error == ""
    assert server.requests[-1].body["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "person", "schema": PERSON, "strict": True},
    }


async def test_openai_json_schema_gets_a_name_and_json_object_its_type(
    server: LLMServer,
) -> None:
    server.script(Reply(words=['{"a":', " 1}"]), Reply(words=["no", "json"]))
    reg = registry(server)
    nameless = ResponseFormat(type="json_schema", json_schema={"schema": {"type": "object"}})
    first = await AgentProcessor(reg).process_request(ask("oa", nameless))
    second = await AgentProcessor(reg).process_request(
        ask("oa", ResponseFormat(type="json_object"))
    )
    await reg.aclose()
    assert server.requests[0].body["response_format"]["json_schema"]["name"] == "response"
    assert server.requests[1].body["response_format"] == {"type": "json_object"}
    assert first.schema_valid is True
    assert second.status == "completed" and second.schema_valid is False
    assert second.schema_error.startswith("not JSON")


async def test_ollama_gets_the_schema_as_format(server: LLMServer) -> None:
    server.script(Reply(words=['{"name": "ada",', ' "age": 36}']), Reply(words=['{"x": 1}']))
    reg = registry(server)
    out = await AgentProcessor(reg).process_request(ask("ol", fmt()))
    obj = await AgentProcessor(reg).process_request(ask("ol", ResponseFormat(type="json_object")))
    await reg.aclose()
    assert server.requests[0].body["format"] == PERSON
    assert server.requests[1].body["format"] == "json"
    # the provider answered, but not what the schema asks: completed, and said so
    assert out.status == "completed" and out.schema_valid is False
    assert out.schema_error == "at /name: 'ada' does not match '^[A-Z]'"
    assert obj.schema_valid is True


async def test_without_response_format_nothing_is_sent_or_checked(server: LLMServer) -> None:
    reg = registry(server)
    plain = ask("oa", fmt()).model_copy(update={"config": LLMConfig(model="m")})
    out = await AgentProcessor(reg).process_request(plain)
    await AgentProcessor(reg).process_request(plain.model_copy(update={"provider": "ol"}))
    await reg.aclose()
    assert out.schema_valid is None
    assert "response_format" not in server.requests[0].body
    assert "format" not in server.requests[1].body


async def test_a_schema_that_cannot_be_used_fails_before_any_call(server: LLMServer) -> None:
    reg = registry(server)
    out = await AgentProcessor(reg).process_request(ask("oa", fmt({"type": "strnig"})))
    await reg.aclose()
    assert out.status == "failed" and not out.attempts and not server.requests
    assert out.error is not None and out.error.error_class == "InvalidResponseFormat"
    assert out.schema_valid is None


@pytest.mark.parametrize(
    "schema",
    [{"$schema": []}, {"$schema": 5}, {"$id": "http://[::1"}, {"$schema": {"a": 1}}],
    ids=["schema-list", "schema-int", "id-bad-url", "schema-object"],
)
def test_a_schema_that_breaks_the_validator_library_is_refused_not_raised(
    schema: dict[str, Any],
) -> None:
    # jsonschema raised TypeError/AttributeError/ValueError on these, past the refusal
    # path: the request became a dead letter with a traceback, not a failed response
    with pytest.raises(InvalidResponseFormat, match="response_format"):
        structured.prepare(fmt(schema))
