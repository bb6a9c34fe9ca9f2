"""What a request names that the operator did not configure costs the worker nothing
that lasts: no concurrency slot of its own, no metric series (`CallRuntime`)."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

from agentstream.agents.llm.runtime import CallRuntime
from agentstream.schemas import Event
from agentstream.schemas.llm import ChatMessage, LLMContext, LLMRequest
from agentstream.streams.settings import get_settings
from agentstream.streams.tables import home_partition


def _request(provider: str, rid: str) -> LLMRequest:
    return LLMRequest(
        request_id=rid,
        agent_id="a",
        provider=provider,
        context=LLMContext(messages=[ChatMessage(role="user", content="hi")]),
    )


def test_unknown_providers_share_one_slot_and_one_label() -> None:
    rt = CallRuntime()  # the settings' providers: `local` only
    made = {rt.slot_for(_request(f"made-up-{i}", f"r{i}")) for i in range(100)}
    assert len(made) == 1
    assert len(rt.slots) == 1
    assert rt.slot_for(_request("local", "l")) is not next(iter(made))
    # a made-up head with a declared fallback waits for the fallback's slot
    fallback = _request("made-up", "f").model_copy(update={"fallback": ["local"]})
    assert rt.slot_for(fallback) is rt.slot_for(_request("local", "l2"))
    assert {rt.provider_label(f"made-up-{i}") for i in range(100)} == {"-"}
    assert rt.provider_label("local") == "local"


def test_models_a_request_makes_up_are_one_label() -> None:
    rt = CallRuntime()
    local = rt.registry.config("local")
    assert rt.model_label("local", local.model) == local.model
    assert {rt.model_label("local", f"x{i}") for i in range(50)} == {"other"}
    assert rt.model_label("-", "anything") == "-"


async def test_the_adapters_token_counter_has_no_series_per_made_up_model() -> None:
    from prometheus_client import REGISTRY

    from agentstream.agents.llm.adapter import MidsceneAdapter
    from agentstream.agents.llm.providers.local import LocalProvider
    from agentstream.schemas.llm import LLMConfig

    adapter = MidsceneAdapter(LocalProvider())
    context = LLMContext(messages=[ChatMessage(role="user", content="hi")])
    for i in range(5):
        await adapter.generate(context, LLMConfig(model=f"made-up-{i}"))
    models = {
        s.labels["model"]
        for m in REGISTRY.collect()
        if m.name == "agentstream_llm_tokens"
        for s in m.samples
        if s.labels.get("provider") == "local"
    }
    assert not any(m.startswith("made-up-") for m in models), models
    assert "other" in models


async def test_exactly_once_waits_for_the_slot_admit_takes(monkeypatch: Any) -> None:
    """Under exactly-once a request is taken only once the slot `admit` will take is
    free (`_wait_for_slot`, before the commit gate). It waited on its head provider's
    slot instead: for a made-up head with a declared fallback, another semaphore than
    admit's (admit then blocked inside the gate), and one more lasting slot per name."""
    from agentstream.agents.llm import agent as llm_agent
    from agentstream.streams.processing import Inbound

    rt = CallRuntime()
    monkeypatch.setattr(llm_agent, "runtime", lambda: rt)
    request = _request("made-up", "f").model_copy(update={"fallback": ["local"]})
    taken = rt.slot_for(request)
    for _ in range(taken._value):
        await taken.acquire()  # every slot admit would take is busy
    # the record as the SDK sends it: under its request id, in the partition that hashes to
    n = get_settings().topic_partitions
    msg = SimpleNamespace(
        topic=get_settings().topic("llm.requests"),
        partition=home_partition(request.request_id, n),
        offset=0,
        timestamp=0.0,
        key=request.request_id.encode(),
    )
    waiting = asyncio.ensure_future(
        llm_agent._wait_for_slot([Inbound(Event.of(request, source="t"), msg)])
    )
    await asyncio.sleep(0.05)
    assert not waiting.done()  # waits for the busy slot, not a fresh one of its own
    assert "made-up" not in rt.slots
    taken.release()
    await asyncio.wait_for(waiting, 5)
