"""Tool calling and the Anthropic provider: the pure translation functions (requests to
each provider's shape, streamed pieces back to complete calls) with odd and hostile
inputs, then each provider's wire against the loopback server (tests/llm_server.py)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from pydantic import ValidationError

from agentstream.agents.llm import tools
from agentstream.agents.llm.processor import AgentProcessor
from agentstream.agents.llm.providers.anthropic import (
    AnthropicProvider,
    AnthropicStream,
    anthropic_body,
)
from agentstream.agents.llm.providers.base import ProviderConfig, StreamChunk
from agentstream.agents.llm.registry import LLMRegistry
from agentstream.schemas import registry as events
from agentstream.schemas.llm import (
    ChatMessage,
    FunctionCall,
    LLMConfig,
    LLMContext,
    LLMRequest,
    ToolCall,
    ToolCallDelta,
)
from agentstream.streams.errors import (
    ProviderProtocolError,
    ProviderRateLimited,
    ProviderRequestError,
    ProviderServerError,
)
from agentstream.streams.resilience import RetryPolicy
from tests.llm_server import Call, LLMServer, Reply

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}
TOOLS_CFG = LLMConfig(model="m1", tools=[WEATHER, TIME], tool_choice="auto", max_tokens=100)  # type: ignore[list-item]

#: two parallel calls, their arguments in fragments
TWO_CALLS = [
    Call("call_a", "get_weather", ['{"ci', 'ty": "Pa', 'ris"}']),
    Call("call_b", "get_time", ['{"tz"', ': "CET"', "}"]),
]


def d(index: int, args: str = "", id_: str = "", name: str = "") -> ToolCallDelta:
    return ToolCallDelta(index=index, id=id_, name=name, arguments=args)


@pytest.fixture(autouse=True)
def _reset(server: LLMServer) -> None:
    server.reset(Reply())


# -- accumulating pieces --------------------------------------------------------------------
def test_pieces_out_of_order_make_calls_in_index_order() -> None:
    acc = tools.ToolCallAccumulator("p")
    for piece in [d(1, "", "c1", "g"), d(0, "", "c0", "f"), d(1, '{"b":'), d(0, "{}"), d(1, "2}")]:
        acc.add(piece)
    calls = acc.finish()
    assert [(c.id, c.function.name, c.function.arguments) for c in calls] == [
        ("c0", "f", "{}"),
        ("c1", "g", '{"b":2}'),
    ]
    assert all(c.arguments_valid for c in calls)


def test_arguments_that_are_not_json_are_kept_and_flagged() -> None:
    acc = tools.ToolCallAccumulator("p")
    acc.add(d(0, '{"city": "Par', "c0", "get_weather"))  # truncated by max_tokens
    (call,) = acc.finish()
    assert call.function.arguments == '{"city": "Par' and call.arguments_valid is False


def test_a_piece_of_a_call_that_never_got_a_name_fails() -> None:
    acc = tools.ToolCallAccumulator("p")
    acc.add(d(0, "", "c0", "f"))
    acc.add(d(7, '{"x": 1}'))  # an index no call started
    with pytest.raises(ProviderProtocolError, match="tool call 7 has arguments but no name"):
        acc.finish()


@pytest.mark.parametrize(
    ("index", "name", "error"),
    [
        (128, "f", "index '128' is not 0..127"),  # bounded: at most 128 calls
        (-1, "f", "is not 0..127"),
        ("0", "f", "is not 0..127"),
        (True, "f", "is not 0..127"),
        (0, "get weather", "is not a tool name"),
        (0, "x" * 65, "is not a tool name"),
        (0, "rm -rf /; echo", "is not a tool name"),
    ],
)
def test_odd_provider_pieces_are_protocol_errors(index: Any, name: str, error: str) -> None:
    with pytest.raises(ProviderProtocolError, match=error):
        tools.delta("p", index, "c", name)


def test_arguments_are_bounded() -> None:
    acc = tools.ToolCallAccumulator("p")
    acc.add(d(0, "", "c", "f"))
    with pytest.raises(ProviderProtocolError, match="exceed"):
        for _ in range(11):
            acc.add(d(0, "x" * 100_000))


def test_a_call_changing_name_midway_fails() -> None:
    acc = tools.ToolCallAccumulator("p")
    acc.add(d(0, "", "c", "f"))
    with pytest.raises(ProviderProtocolError, match="changed its name"):
        acc.add(d(0, "", "", "g"))


# -- the request's tools and messages -------------------------------------------------------
@pytest.mark.parametrize(
    ("config", "error"),
    [
        ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "tool name"),
        ({"tools": [{"type": "function", "function": {"name": "é"}}]}, "tool name"),
        ({"tools": [WEATHER, WEATHER]}, "same name"),
        ({"tools": [WEATHER], "tool_choice": {"function": {"name": "nope"}}}, "not a tool given"),
        ({"tool_choice": "required"}, "required without tools"),
        ({"tool_choice": "sometimes"}, "tool_choice"),
        ({"tools": [TIME] * 129}, "at most 128"),
        ({"tools": [{"type": "retrieval", "function": {"name": "f"}}]}, "function"),
    ],
)
def test_tool_mistakes_are_refused_in_the_request(config: dict[str, Any], error: str) -> None:
    with pytest.raises(ValidationError, match=error):
        LLMConfig.model_validate(config)


def test_tool_fields_only_on_their_roles() -> None:
    with pytest.raises(ValidationError, match="tool_calls on a user message"):
        ChatMessage(role="user", content="x", tool_calls=[call("c", "f", "{}")])
    with pytest.raises(ValidationError, match="tool_call_id on a assistant message"):
        ChatMessage(role="assistant", content="x", tool_call_id="c")


def call(id_: str, name: str, args: str) -> ToolCall:
    return ToolCall(id=id_, function=FunctionCall(name=name, arguments=args))


#: a conversation after two parallel calls: the calls, both results, and a follow-up
ROUND_TRIP = LLMContext(
    system_prompt="Be brief.",
    messages=[
        ChatMessage(role="user", content="Weather and time in Paris?"),
        ChatMessage(
            role="assistant",
            content="",
            tool_calls=[
                call("call_a", "get_weather", '{"city": "Paris"}'),
                call("call_b", "get_time", '{"tz": "CET"}'),
            ],
        ),
        ChatMessage(role="tool", tool_call_id="call_a", content="18C, cloudy"),
        ChatMessage(role="tool", tool_call_id="call_b", content="14:02"),
    ],
)


def test_openai_messages_carry_calls_and_results() -> None:
    msgs = tools.openai_messages(ROUND_TRIP)
    assert msgs[2] == {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call_a",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
            },
            {
                "id": "call_b",
                "type": "function",
                "function": {"name": "get_time", "arguments": '{"tz": "CET"}'},
            },
        ],
    }
    assert msgs[3] == {"role": "tool", "content": "18C, cloudy", "tool_call_id": "call_a"}


def test_ollama_messages_carry_arguments_as_objects_and_tool_names() -> None:
    msgs = tools.ollama_messages("ol", ROUND_TRIP)
    assert msgs[2]["tool_calls"][0] == {
        "function": {"name": "get_weather", "arguments": {"city": "Paris"}}
    }
    assert msgs[4] == {"role": "tool", "content": "14:02", "tool_name": "get_time"}


def test_anthropic_body_blocks_system_and_choices() -> None:
    cfg = TOOLS_CFG.model_copy(update={"temperature": 1.7, "stop": ["END"], "max_tokens": None})
    body = anthropic_body("an", ROUND_TRIP, cfg, "claude-x", 4096, True)
    assert body["system"] == "Be brief." and body["max_tokens"] == 4096
    assert body["temperature"] == 1.0 and body["stop_sequences"] == ["END"]
    assert [m["role"] for m in body["messages"]] == ["user", "assistant", "user"]
    assert body["messages"][1]["content"] == [
        {"type": "tool_use", "id": "call_a", "name": "get_weather", "input": {"city": "Paris"}},
        {"type": "tool_use", "id": "call_b", "name": "get_time", "input": {"tz": "CET"}},
    ]
    # both results in one user message, as the API requires
    assert body["messages"][2]["content"] == [
        {"type": "tool_result", "tool_use_id": "call_a", "content": "18C, cloudy"},
        {"type": "tool_result", "tool_use_id": "call_b", "content": "14:02"},
    ]
    assert body["tools"][0] == {
        "name": "get_weather",
        "description": "Weather in a city",
        "input_schema": WEATHER["function"]["parameters"],  # type: ignore[index]
    }
    assert body["tools"][1]["input_schema"] == {"type": "object"}
    assert body["tool_choice"] == {"type": "auto"}
    for choice, sent in [
        ("required", {"type": "any"}),
        ("none", {"type": "none"}),
        (
            {"type": "function", "function": {"name": "get_time"}},
            {"type": "tool", "name": "get_time"},
        ),
    ]:
        c = LLMConfig(tools=[WEATHER, TIME], tool_choice=choice)  # type: ignore[list-item,arg-type]
        assert anthropic_body("an", ROUND_TRIP, c, "m", 10, False)["tool_choice"] == sent


def test_anthropic_refuses_what_it_cannot_send() -> None:
    orphan = LLMContext(
        messages=[
            ChatMessage(role="user", content="hi"),
            ChatMessage(role="tool", tool_call_id="nope", content="r"),
        ]
    )
    with pytest.raises(ProviderRequestError, match="message 1 \\(tool\\) answers no earlier"):
        anthropic_body("an", orphan, LLMConfig(), "m", 10, True)
    broken = LLMContext(
        messages=[
            ChatMessage(role="user", content="hi"),
            ChatMessage(role="assistant", tool_calls=[call("c", "f", '{"a": ')]),
            ChatMessage(role="tool", tool_call_id="c", content="r"),
        ]
    )
    with pytest.raises(ProviderRequestError, match="not a JSON object"):
        anthropic_body("an", broken, LLMConfig(), "m", 10, True)
    with pytest.raises(ProviderRequestError, match="no user or assistant"):
        anthropic_body(
            "an",
            LLMContext(messages=[ChatMessage(role="system", content="s")]),
            LLMConfig(),
            "m",
            1,
            True,
        )


# -- Anthropic's stream events --------------------------------------------------------------
def feed_all(events_: list[dict[str, Any]]) -> tuple[AnthropicStream, list[StreamChunk]]:
    state = AnthropicStream("an")
    out = [c for e in events_ if (c := state.feed(e)) is not None]
    return state, out


START = {"type": "message_start", "message": {"model": "claude-x", "usage": {"input_tokens": 5}}}


def tool_start(index: int, id_: str, name: str) -> dict[str, Any]:
    return {
        "type": "content_block_start",
        "index": index,
        "content_block": {"type": "tool_use", "id": id_, "name": name, "input": {}},
    }


def json_delta(index: int, part: str) -> dict[str, Any]:
    return {
        "type": "content_block_delta",
        "index": index,
        "delta": {"type": "input_json_delta", "partial_json": part},
    }


def test_anthropic_events_make_text_calls_usage_and_finish() -> None:
    state, chunks = feed_all(
        [
            START,
            {"type": "ping"},
            {
                "type": "content_block_start",
                "index": 0,
                "content_block": {"type": "text", "text": ""},
            },
            {
                "type": "content_block_delta",
                "index": 0,
                "delta": {"type": "text_delta", "text": "Hi"},
            },
            {"type": "content_block_stop", "index": 0},
            {"type": "something_new", "x": 1},  # unknown: ignored
            tool_start(1, "toolu_1", "get_weather"),
            json_delta(1, '{"city":'),
            json_delta(1, ' "Paris"}'),
            tool_start(2, "toolu_2", "get_time"),  # no parameters: no input_json_delta
            {
                "type": "message_delta",
                "delta": {"stop_reason": "tool_use"},
                "usage": {"output_tokens": 9},
            },
            {"type": "message_stop"},
        ]
    )
    assert state.done and state.model == "claude-x"
    assert "".join(c.delta for c in chunks) == "Hi"
    acc = tools.ToolCallAccumulator("an")
    for c in chunks:
        for piece in c.tool_calls or ():
            acc.add(piece)
    calls = acc.finish()
    assert [(c.id, c.function.arguments, c.arguments_valid) for c in calls] == [
        ("toolu_1", '{"city": "Paris"}', True),
        ("toolu_2", "", False),
    ]
    last = chunks[-1]
    assert last.finish_reason == "tool_calls"
    assert last.usage is not None and (last.usage.prompt_tokens, last.usage.completion_tokens) == (
        5,
        9,
    )


@pytest.mark.parametrize(
    ("stop", "finish"),
    [
        ("end_turn", "stop"),
        ("max_tokens", "length"),
        ("tool_use", "tool_calls"),
        ("stop_sequence", "stop"),
        ("pause_turn", "pause_turn"),
    ],
)
def test_anthropic_stop_reasons(stop: str, finish: str) -> None:
    _, chunks = feed_all([START, {"type": "message_delta", "delta": {"stop_reason": stop}}])
    assert chunks[-1].finish_reason == finish


@pytest.mark.parametrize(
    ("error_type", "cls"),
    [
        ("overloaded_error", ProviderServerError),
        ("api_error", ProviderServerError),
        ("rate_limit_error", ProviderRateLimited),
        ("invalid_request_error", ProviderRequestError),
    ],
)
def test_an_error_event_mid_stream_raises_its_kind(error_type: str, cls: type[Exception]) -> None:
    state = AnthropicStream("an")
    state.feed(START)
    with pytest.raises(cls, match=error_type):
        state.feed({"type": "error", "error": {"type": error_type, "message": "Overloaded"}})


@pytest.mark.parametrize(
    ("event", "error"),
    [
        (json_delta(3, "{}"), "no tool_use block"),  # a block that never started
        ({"type": "content_block_delta", "index": 0}, "without delta"),
        (tool_start(0, "t", "bad name!"), "not a tool name"),
        ({"type": "content_block_start", "index": "0", "content_block": {}}, "without index"),
        ([1, 2], "not an object"),
    ],
)
def test_odd_anthropic_events_are_protocol_errors(event: Any, error: str) -> None:
    state = AnthropicStream("an")
    state.feed(START)
    with pytest.raises(ProviderProtocolError, match=error):
        state.feed(event)


def test_a_flood_of_tool_use_blocks_is_bounded() -> None:
    state = AnthropicStream("an")
    with pytest.raises(ProviderProtocolError, match=r"is not 0\.\.127"):
        for i in range(1000):
            state.feed(tool_start(i, f"t{i}", "f"))
    assert state.tool_calls_started() == 128


# -- on the wire, against the loopback server -----------------------------------------------
async def secret(name: str) -> str | None:
    return {"llm.an.api_key": "sk-ant-test"}.get(name)


def reg(server: LLMServer) -> LLMRegistry:
    r = LLMRegistry(secrets=secret)
    r.register_provider("oa", {"kind": "vllm", "base_url": server.url + "/v1"})
    r.register_provider("az", {"kind": "azure", "base_url": server.url, "deployment": "dep"})
    r.register_provider("ol", {"kind": "ollama", "base_url": server.url})
    r.register_provider(
        "an", {"kind": "anthropic", "base_url": server.url, "requires_key": True, "max_tokens": 321}
    )
    return r


def ask(
    provider: str, context: LLMContext | None = None, *, stream: bool = True, **cfg: Any
) -> LLMRequest:
    return LLMRequest(
        request_id="r",
        agent_id="a",
        provider=provider,
        stream=stream,
        context=context or LLMContext(messages=[ChatMessage(role="user", content="Paris?")]),
        config=TOOLS_CFG.model_copy(update=cfg),
    )


async def test_anthropic_streams_text_with_its_headers_and_usage(server: LLMServer) -> None:
    server.script(Reply(words=["bonjour", "Paris"]))
    got: list[str] = []

    async def sink(delta: str, provider: str, attempt: int, **_: Any) -> None:
        got.append(delta)

    out = await AgentProcessor(reg(server)).process_request(
        ask(
            "an",
            LLMContext(system_prompt="Be brief.", messages=ROUND_TRIP.messages[:1]),
            max_tokens=None,
            tools=None,
            tool_choice=None,
        ),
        on_chunk=sink,
    )
    assert out.status == "completed" and out.content == "bonjour Paris" == "".join(got)
    assert out.finish_reason == "stop" and out.tool_calls == [] and out.model == "m1"
    # input 11 + cache reads 2; output as message_delta said
    assert out.usage is not None and not out.usage.estimated
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (13, 2)
    seen = server.requests[-1]
    assert seen.path == "/v1/messages"
    assert seen.headers["x-api-key"] == "sk-ant-test"
    assert seen.headers["anthropic-version"] == "2023-06-01"
    assert "Authorization" not in seen.headers
    assert seen.body["system"] == "Be brief." and seen.body["max_tokens"] == 321
    assert seen.body["messages"] == [
        {"role": "user", "content": [{"type": "text", "text": "Weather and time in Paris?"}]}
    ]


@pytest.mark.parametrize("provider", ["oa", "az", "an", "ol"])
@pytest.mark.parametrize("stream", [True, False])
async def test_two_parallel_calls_in_fragments(
    server: LLMServer, provider: str, stream: bool
) -> None:
    """OpenAI-style: the two calls' fragments interleaved (index 0, 1, 0, 1 …); Anthropic:
    one tool_use block after the other, input_json_delta fragments; Ollama: whole calls."""
    server.script(Reply(words=["Checking."], calls=TWO_CALLS))
    pieces: list[ToolCallDelta] = []

    async def sink(delta: str, provider: str, attempt: int, tool_calls: Any = None) -> None:
        pieces.extend(tool_calls or ())

    out = await AgentProcessor(reg(server)).process_request(
        ask(provider, stream=stream), on_chunk=sink
    )
    assert out.status == "completed", out.error
    assert out.content == "Checking."
    assert out.finish_reason == "tool_calls"
    names = ["get_weather", "get_time"]
    assert [c.function.name for c in out.tool_calls] == names
    assert [json.loads(c.function.arguments) for c in out.tool_calls] == [
        {"city": "Paris"},
        {"tz": "CET"},
    ]
    assert all(c.arguments_valid for c in out.tool_calls)
    if provider != "ol":  # Ollama names no ids: call_<index>
        assert [c.id for c in out.tool_calls] == ["call_a", "call_b"]
    else:
        assert [c.id for c in out.tool_calls] == ["call_0", "call_1"]
    if stream:
        indexes = [p.index for p in pieces]
        if provider in ("oa", "az"):
            assert indexes == [0, 1, 0, 1, 0, 1, 0, 1]  # starts, then fragments interleaved
        elif provider == "an":
            assert indexes == [0, 0, 0, 0, 1, 1, 1, 1]
        else:
            assert indexes == [0, 1]
        if provider != "ol":
            assert sum(1 for p in pieces if p.arguments) == 6  # every fragment, as streamed
    else:
        assert pieces == []
    body = server.requests[-1].body
    if provider == "an":
        assert [t["name"] for t in body["tools"]] == names and body["tool_choice"] == {
            "type": "auto"
        }
    elif provider == "ol":
        assert body["tools"] == [WEATHER, TIME] and "tool_choice" not in body
    else:
        assert body["tools"] == [WEATHER, TIME] and body["tool_choice"] == "auto"


@pytest.mark.parametrize("provider", ["oa", "an", "ol"])
async def test_tool_results_go_back_in_each_providers_shape(
    server: LLMServer, provider: str
) -> None:
    server.script(Reply(words=["18C", "at", "14:02"]))
    out = await AgentProcessor(reg(server)).process_request(ask(provider, ROUND_TRIP))
    assert out.status == "completed" and out.finish_reason == "stop" and out.tool_calls == []
    msgs = server.requests[-1].body["messages"]
    if provider == "oa":
        assert msgs == tools.openai_messages(ROUND_TRIP)
        assert msgs[-1]["tool_call_id"] == "call_b"
    elif provider == "an":
        assert msgs[-1]["content"][1] == {
            "type": "tool_result",
            "tool_use_id": "call_b",
            "content": "14:02",
        }
    else:
        assert msgs[2]["tool_calls"][1]["function"]["arguments"] == {"tz": "CET"}
        assert msgs[-1]["tool_name"] == "get_time"


async def test_none_sends_no_tools_to_ollama(server: LLMServer) -> None:
    await AgentProcessor(reg(server)).process_request(ask("ol", tool_choice="none"))
    assert "tools" not in server.requests[-1].body


async def test_anthropic_error_event_mid_stream_is_retried(server: LLMServer) -> None:
    server.script(Reply(kind="error_event", after=1), Reply(words=["ok"]))
    policy = RetryPolicy(max_attempts=2, base_delay_s=0.01)
    out = await AgentProcessor(reg(server), policy=policy).process_request(
        ask("an", tools=None, tool_choice=None)
    )
    assert out.status == "completed" and out.content == "ok"
    first = out.attempts[0]
    assert first.outcome == "error" and "overloaded_error: Overloaded" in (first.error or "")


async def test_anthropic_529_honours_retry_after_and_401_is_final(server: LLMServer) -> None:
    server.script(Reply(kind="status", status=529, retry_after="0.3"), Reply(words=["ok"]))
    policy = RetryPolicy(max_attempts=2, base_delay_s=0.01)
    out = await AgentProcessor(reg(server), policy=policy).process_request(
        ask("an", tools=None, tool_choice=None)
    )
    assert out.status == "completed"
    assert out.attempts[0].status_code == 529 and out.attempts[0].retry_after_s == 0.3
    gap = server.requests[-1].at - server.requests[-2].at
    assert gap >= 0.3  # waited what the server asked, not the 10 ms backoff
    for status in (400, 401, 403):
        server.reset(Reply(kind="status", status=status))
        out = await AgentProcessor(reg(server), policy=policy).process_request(ask("an"))
        assert out.status == "failed" and len(out.attempts) == 1
        assert out.error is not None and not out.error.retriable


async def test_anthropic_stream_without_message_stop_or_malformed(server: LLMServer) -> None:
    p = AnthropicProvider(ProviderConfig(name="an", kind="anthropic", base_url=server.url))
    for kind, error in (("no_done", "before message_stop"), ("malformed", "malformed SSE")):
        server.script(Reply(kind=kind))  # type: ignore[arg-type]
        with pytest.raises(ProviderProtocolError, match=error):
            async for _ in p.stream(ROUND_TRIP, LLMConfig(model="m")):
                pass
    await p.aclose()


# -- events --------------------------------------------------------------------------------
def test_v2_requests_and_responses_read_as_current() -> None:
    req = {
        "request_id": "r",
        "agent_id": "a",
        "context": {"messages": [{"role": "tool", "content": "old tool text"}]},
    }
    resp = {"request_id": "r", "status": "completed", "content": "x"}
    for type_, payload in (("llm.request", req), ("llm.response", resp)):
        raw = {"type": type_, "schema_version": 2, "source": "old", "payload": payload}
        ev = events.decode(json.dumps(raw).encode())
        # requests are at v3; responses at v4 (budget refusals), read through v3
        assert ev.schema_version == (3 if type_ == "llm.request" else 4)
    assert ev.payload.tool_calls == [] and ev.payload.finish_reason == ""


def test_the_documented_tool_request_and_round_trip(tmp_path: Any) -> None:
    """docs/llm.md's tool request (routed to the Anthropic provider of its providers
    file), response fragment and messages sent back, as a user would copy them."""
    import re
    from pathlib import Path

    from agentstream.agents.llm.models import route
    from agentstream.streams.settings import Settings

    doc = (Path(__file__).resolve().parents[2] / "docs" / "llm.md").read_text()
    files = doc[doc.index("### Providers file") :]
    yaml_text = re.search(r"```yaml\n(.*?)```", files, re.S)
    assert yaml_text is not None
    (tmp_path / "p.yaml").write_text(yaml_text.group(1))
    r = LLMRegistry.from_settings(Settings(llm_providers_file=tmp_path / "p.yaml"))
    section = doc[doc.index("### Tool calling") :]
    blocks = re.findall(r"```json\n(.*?)```", section, re.S)[:3]
    request = LLMRequest.model_validate(json.loads(blocks[0]))
    hops = route(
        r.catalog,
        model=request.config.model,
        provider=request.provider,
        fallback=[],
        default_provider="local",
    ).hops
    assert [(h.provider, h.model) for h in hops] == [("anthropic", "claude-3-5-haiku-latest")]
    response = json.loads("{" + blocks[1] + "}")
    calls = [ToolCall.model_validate(c) for c in response["tool_calls"]]
    assert calls[0].arguments_valid and response["finish_reason"] == "tool_calls"
    messages = [ChatMessage.model_validate(m) for m in json.loads("[" + blocks[2] + "]")]
    ctx = LLMContext(messages=[*request.context.messages, *messages])
    body = anthropic_body("anthropic", ctx, request.config, "m", 10, True)
    assert body["messages"][2]["content"][0]["tool_use_id"] == "toolu_01A"


def test_a_stream_cut_short_keeps_its_named_calls_and_drops_a_nameless_piece() -> None:
    acc = tools.ToolCallAccumulator("p")
    acc.add(ToolCallDelta(index=0, id="c0", name="get_weather", arguments='{"ci'))
    acc.add(ToolCallDelta(index=1, arguments='{"q": '))  # its name never came
    with pytest.raises(ProviderProtocolError):
        acc.finish()
    [kept] = acc.finish(skip_unnamed=True)
    assert (kept.id, kept.function.name, kept.function.arguments) == ("c0", "get_weather", '{"ci')
    assert kept.arguments_valid is False
