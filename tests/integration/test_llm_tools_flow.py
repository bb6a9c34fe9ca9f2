"""Tool calling through Kafka: a request with tools, the model's two parallel calls
streamed as ordered chunk events and sealed in the final response, then the tools'
results sent back and answered — against the loopback server speaking Anthropic's
Messages API and the OpenAI-compatible one."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from agentstream.schemas import Event
from agentstream.schemas.llm import ChatMessage, LLMConfig, LLMContext, LLMRequest, Tool
from tests.integration.test_llm_flow import start_llm_worker
from tests.llm_server import Call, LLMServer, Reply

pytestmark = pytest.mark.integration

TOOLS = [
    Tool.model_validate(
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
            },
        }
    ),
    Tool.model_validate({"type": "function", "function": {"name": "get_time"}}),
]
CALLS = [
    Call("call_w", "get_weather", ['{"ci', 'ty": ', '"Paris"}']),
    Call("call_t", "get_time", ["{", '"tz": "CET"', "}"]),
]


def request(rid: str, provider: str, messages: list[ChatMessage]) -> Event[Any]:
    return Event.of(
        LLMRequest(
            request_id=rid,
            agent_id="agent-7",
            provider=provider,
            context=LLMContext(messages=messages),
            config=LLMConfig(tools=TOOLS, tool_choice="auto", max_tokens=64),
        ),
        source="test",
    )


async def test_tool_call_round_trips(settings_env: dict[str, str], tmp_path: Path) -> None:
    server = LLMServer().start()
    providers = tmp_path / "providers.yaml"
    providers.write_text(
        "providers:\n"
        f"  claude: {{kind: anthropic, base_url: '{server.url}', model: claude-loop}}\n"
        f"  loop: {{kind: vllm, base_url: '{server.url}/v1', model: loop-model}}\n"
    )
    env = {
        **settings_env,
        "AGENTSTREAM_AGENTS": "llm",
        "AGENTSTREAM_LLM_PROVIDERS_FILE": str(providers),
        # one chunk event per provider delta: the pieces' order is then the wire's
        "AGENTSTREAM_LLM_CHUNK_COALESCE_MS": "0",
    }
    _, _port, topics, worker, client = await start_llm_worker(env, tmp_path)
    try:
        for provider, path in (("claude", "/v1/messages"), ("loop", "/v1/chat/completions")):
            question = ChatMessage(role="user", content=f"weather and time in Paris ({provider})?")
            server.script(Reply(words=["Checking."], calls=CALLS))
            await client.publish("llm.requests", request(f"{provider}-1", provider, [question]))
            first = await topics.response(f"{provider}-1")
            assert first.status == "completed", first.error
            assert first.finish_reason == "tool_calls" and first.content == "Checking."
            assert [(c.id, c.function.name) for c in first.tool_calls] == [
                ("call_w", "get_weather"),
                ("call_t", "get_time"),
            ]
            assert [json.loads(c.function.arguments) for c in first.tool_calls] == [
                {"city": "Paris"},
                {"tz": "CET"},
            ]
            assert all(c.arguments_valid for c in first.tool_calls)
            # the chunk events: in sequence, each call's pieces joined in event order are
            # its arguments, and the first piece of each call names it
            chunks = topics.chunks(f"{provider}-1")
            assert [c.sequence for c in chunks] == list(range(len(chunks)))
            assert first.chunks == len(chunks)
            pieces = [p for c in chunks for p in c.tool_calls]
            for index, call in enumerate(first.tool_calls):
                mine = [p for p in pieces if p.index == index]
                assert (mine[0].id, mine[0].name) == (call.id, call.function.name)
                assert "".join(p.arguments for p in mine) == call.function.arguments
            if provider == "loop":  # OpenAI streams parallel calls interleaved
                assert [p.index for p in pieces if p.arguments] == [0, 1, 0, 1, 0, 1]

            # -- the tools' results sent back, answered ---------------------------------------
            server.script(Reply(words=["18C", "at", "14:02"]))
            follow_up = [
                question,
                ChatMessage(role="assistant", content=first.content, tool_calls=first.tool_calls),
                ChatMessage(role="tool", tool_call_id="call_w", content="18C"),
                ChatMessage(role="tool", tool_call_id="call_t", content="14:02"),
            ]
            await client.publish("llm.requests", request(f"{provider}-2", provider, follow_up))
            second = await topics.response(f"{provider}-2")
            assert second.status == "completed" and second.content == "18C at 14:02"
            assert second.finish_reason == "stop" and second.tool_calls == []
            sent = server.requests[-1]
            assert sent.path == path
            if provider == "claude":
                assert sent.body["messages"][1]["content"][1] == {
                    "type": "tool_use",
                    "id": "call_w",
                    "name": "get_weather",
                    "input": {"city": "Paris"},
                }
                assert sent.body["messages"][2] == {
                    "role": "user",
                    "content": [
                        {"type": "tool_result", "tool_use_id": "call_w", "content": "18C"},
                        {"type": "tool_result", "tool_use_id": "call_t", "content": "14:02"},
                    ],
                }
            else:
                assert sent.body["messages"][1]["tool_calls"][1]["function"] == {
                    "name": "get_time",
                    "arguments": '{"tz": "CET"}',
                }
                assert sent.body["messages"][3] == {
                    "role": "tool",
                    "content": "14:02",
                    "tool_call_id": "call_t",
                }
        assert worker.alive(), worker.tail()
    finally:
        await topics.stop()
        await client.stop()
        worker.stop()
        server.stop()
