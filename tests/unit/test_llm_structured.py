"""Structured output: the request's `response_format`, on the wire of each provider kind
(against the loopback server) and the final answer checked against it."""

from __future__ import annotations

import socket
import threading
import time
from typing import Any

import pytest
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
def _reset(server: LLMServer) -> None:
    server.reset(Reply())


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
    """(a+)+$ takes Python's `re` exponential time on "aaa…!"; RE2 is linear."""
    evil = fmt({"type": "string", "pattern": "^(a+)+$"})
    start = time.monotonic()
    verdict = check(evil, '"' + "a" * 5000 + '!"')
    assert verdict is not None and not verdict.valid
    assert time.monotonic() - start < 1.0


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


def test_a_remote_ref_is_not_fetched() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(4)
        listener.setblocking(False)
        port = listener.getsockname()[1]
        remote = fmt({"$ref": f"http://127.0.0.1:{port}/schema.json"})
        # in a thread: a check that did fetch would wait forever on this silent listener
        verdicts: list[Verdict | None] = []
        worker = threading.Thread(target=lambda: verdicts.append(check(remote, '{"a": 1}')))
        worker.daemon = True
        worker.start()
        worker.join(10)
        assert verdicts, "the check tried to fetch the remote $ref"
        verdict = verdicts[0]
        assert verdict is not None and not verdict.valid
        assert "cannot be resolved" in verdict.error
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
