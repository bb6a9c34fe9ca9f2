"""AGENTSTREAM_EVENT_LOOP=uvloop: the worker really runs on uvloop and the LLM stage works
end to end on it (streamed chunks in order, one final response)."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from agentstream.schemas import Event
from agentstream.schemas.llm import (
    ChatMessage,
    LLMConfig,
    LLMContext,
    LLMRequest,
    LLMResponse,
    LLMStreamChunk,
)
from agentstream.streams.client import AsyncClient
from agentstream.streams.settings import Settings
from tests.support import Worker, read_topic

pytestmark = pytest.mark.integration


async def test_uvloop_worker_answers_llm_requests(
    settings_env: dict[str, str], tmp_path: Path
) -> None:
    env = {
        **settings_env,
        "AGENTSTREAM_AGENTS": "llm,health",
        "AGENTSTREAM_EVENT_LOOP": "uvloop",
    }
    settings = Settings.from_env(env)
    worker = Worker(env, tmp_path / "worker.log").start()
    try:
        async with httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{env['AGENTSTREAM_WEB_PORT']}", timeout=10
        ) as http:
            health = (await http.get("/health")).json()
        assert health["event_loop"] == "uvloop.Loop", health

        client = AsyncClient(settings)
        await client.start()
        try:
            for i in range(3):
                request = LLMRequest(
                    request_id=f"uv-{i}",
                    agent_id="agent-1",
                    provider="local",
                    context=LLMContext(messages=[ChatMessage(role="user", content=f"hi {i}")]),
                    config=LLMConfig(model="local-echo", max_tokens=6),
                )
                await client.publish("llm.requests", Event.of(request, source="test"))
        finally:
            await client.stop()

        responses = await read_topic(
            settings.bootstrap, settings.topic("llm.responses"), expect=3, timeout=60
        )
        finals = {
            ev.payload.request_id: ev.payload
            for _, ev in responses
            if ev is not None and isinstance(ev.payload, LLMResponse)
        }
        assert sorted(finals) == ["uv-0", "uv-1", "uv-2"]
        assert all(r.status == "completed" and r.content for r in finals.values())
        chunks = await read_topic(
            settings.bootstrap,
            settings.topic("llm.chunks"),
            expect=sum(r.chunks for r in finals.values()),
            timeout=30,
        )
        by_request: dict[str, list[LLMStreamChunk]] = {}
        for _, ev in chunks:
            assert ev is not None and isinstance(ev.payload, LLMStreamChunk)
            by_request.setdefault(ev.payload.request_id, []).append(ev.payload)
        for rid, response in finals.items():
            seq = by_request[rid]
            assert [c.sequence for c in seq] == list(range(len(seq)))
            assert "".join(c.delta for c in seq) == response.content
        assert worker.alive(), worker.tail()

        # SIGUSR2 logs every task's await chain, down to the agent's own line: the stall
        # diagnosis the crash tests rely on, on uvloop too; the worker keeps running
        dump = worker.task_dump()
        assert "agents/llm/agent.py" in dump and "in call_llm" in dump, dump[:3000]
        # and the consumer's state of each assigned partition (False = not paused)
        requests = settings.topic("llm.requests")
        assert any(
            line.strip().startswith(f"{requests}[0] False False") for line in dump.splitlines()
        ), dump[-3000:]
        # what each agent was handed and the exactly-once gate (idle: at-least-once)
        assert "GATE active 0 committing False" in dump, dump[-3000:]
        assert worker.alive()
    finally:
        worker.stop()
