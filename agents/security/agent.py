"""enforce_policy: every message on agent.messages ends accepted, rejected or dead-lettered."""

from __future__ import annotations

from typing import Any

from schemas import AgentMessage, Event
from streams.app import app, catalogue_topic
from streams.processing import Inbound, decoded_batches, emit, guarded
from streams.topics import AGENT_MESSAGES, AGENT_MESSAGES_ACCEPTED

CONSUMER = "enforce_policy"


@app.agent(catalogue_topic(AGENT_MESSAGES), name=CONSUMER)
async def enforce_policy(stream: Any) -> None:
    async for batch in decoded_batches(stream, consumer=CONSUMER, accept=[AgentMessage.TYPE]):
        for inbound in batch:
            await guarded(inbound, CONSUMER, _decide)


async def _decide(inbound: Inbound) -> None:
    event: Event[Any] = inbound.event
    await emit(AGENT_MESSAGES_ACCEPTED, event)
