"""The LLM provider's readiness check: one setup request at a time, reused for a while.

`/ready` needs no token, and the check is a real (for some providers billed) request to
the provider; its 30 s cache had no single flight, so every request arriving while it was
stale made its own."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from agentstream.agents.llm import agent


async def test_concurrent_checks_make_one_setup_request(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []

    async def check_provider_setup(name: str) -> bool:
        calls.append(name)
        await asyncio.sleep(0.05)
        return True

    rt = SimpleNamespace(
        processor=SimpleNamespace(breakers={}),
        registry=SimpleNamespace(check_provider_setup=check_provider_setup),
    )
    monkeypatch.setattr(agent, "runtime", lambda: rt)
    check = agent._provider_check("openai")
    answers = await asyncio.gather(*(check() for _ in range(50)))
    assert calls == ["openai"] and set(answers) == {("ok", "reachable")}
    await check()  # within SETUP_CHECK_TTL_S: reused
    assert calls == ["openai"]
