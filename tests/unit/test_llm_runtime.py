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


#: an 853-byte request whose answer from `local` is ten strings of 99,990 characters
HUGE = {
    "type": "array",
    "minItems": 10,
    "items": {"type": "string", "minLength": 99990},
}


async def test_a_final_response_too_large_to_send_fails_and_keeps_its_usage() -> None:
    """Every request ends with one final response: one whose encoding is over the
    producer's limit could not be sent (no response, no usage counted, a billed call
    past every budget). It becomes a `failed` one without the content, that fits."""
    from agentstream.agents.llm.processor import AgentProcessor
    from agentstream.agents.llm.registry import LLMRegistry
    from agentstream.schemas import encode
    from agentstream.schemas.llm import LLMConfig, ResponseFormat
    from agentstream.streams.audit_chain import seal
    from agentstream.streams.settings import output_limit
    from agentstream.streams.tables import llm as tables

    fmt = ResponseFormat(type="json_schema", json_schema={"name": "big", "schema": HUGE})
    request = _request("local", "huge").model_copy(
        update={"config": LLMConfig(response_format=fmt)}
    )
    inbound = Event.of(request, source="test")
    assert len(encode(inbound)) < 1000
    outcome = await AgentProcessor(LLMRegistry(secrets=None)).process_request(request)
    assert outcome.status == "completed" and len(outcome.content) > 999_900
    rt = CallRuntime()
    event = rt.final_event(inbound, request, outcome)
    # sealed with the longest chain fields: what the producer is handed
    sealed = seal(event, "f" * 64).model_copy(
        update={
            "payload": event.payload.model_copy(
                update={"hash": "f" * 64, "signed_by": "k" * 256, "signature": "s" * 256}
            )
        }
    )
    limit = output_limit(get_settings().max_event_bytes, len(event.key.encode()))
    assert len(encode(sealed)) <= limit
    response = event.payload
    assert response.status == "failed" and response.content == ""
    assert response.usage == outcome.usage and response.usage is not None
    assert response.usage.completion_tokens > 200_000
    assert response.error is not None and response.error.error_class == "ResponseTooLarge"
    assert "exceeded the limit" in response.error.message
    assert response.provider == "local" and response.attempts == outcome.attempts
    # counted, so budgets and `llm usage` see the call
    counted = tables.usage_increments([response], 4)
    assert sum(v.get("completion_tokens", 0) for v in counted.values()) == 3 * (
        response.usage.completion_tokens
    )
    # one that fits is sent as it is
    small = await AgentProcessor(LLMRegistry(secrets=None)).process_request(
        _request("local", "small")
    )
    assert rt.final_event(inbound, request, small).payload.content == small.content


def test_a_response_still_too_large_without_its_content_drops_its_attempts() -> None:
    from agentstream.agents.llm.runtime import fit_response
    from agentstream.schemas import encode
    from agentstream.schemas.llm import AttemptRecord, LLMResponse, Usage

    def size_of(r: LLMResponse) -> int:
        return len(encode(Event.of(r, source="t")))

    attempts = [
        AttemptRecord(provider="local", attempt=i, outcome="error", error="e" * 2000)
        for i in range(1, 20)
    ]
    usage = Usage(prompt_tokens=1, completion_tokens=2, total_tokens=3)
    big = LLMResponse(
        request_id="r",
        status="cancelled",
        content="x" * 50_000,
        usage=usage,
        provider="local",
        model="local-echo",
        attempts=attempts,
        chunks=7,
    )
    fitted = fit_response(big, size_of, 10_000)
    assert size_of(fitted) <= 10_000 and fitted.status == "failed" and not fitted.attempts
    assert fitted.usage == usage and fitted.chunks == 7 and fitted.model == "local-echo"
    assert fitted.error is not None and "so are its attempts" in fitted.error.message
    assert "7 chunks" in fitted.error.message
    # room for the attempts: kept
    kept = fit_response(big, size_of, 45_000)
    assert kept.attempts == attempts and kept.content == ""
    assert fit_response(big, size_of, 1_000_000) is big
