"""Stage (c) of the core benchmark: a passthrough agent built exactly like the pipeline's
agents (raw bytes in, `decoded_batches` with pydantic validation and the dead-letter
path, `guarded` handler, `emit` re-encoding the event), run by a real worker with
``AGENTSTREAM_AGENTS=bench.passthrough``."""

from __future__ import annotations

from typing import Any

from agentstream.schemas import AgentMessage
from agentstream.streams.app import app, catalogue_topic
from agentstream.streams.processing import Inbound, decoded_batches, emit, guarded
from agentstream.streams.topics import AGENT_MESSAGES, AGENT_MESSAGES_ACCEPTED

CONSUMER = "bench_passthrough"


@app.agent(catalogue_topic(AGENT_MESSAGES), name=CONSUMER)
async def pass_through(stream: Any) -> None:
    async for batch in decoded_batches(stream, consumer=CONSUMER, accept=[AgentMessage.TYPE]):
        for inbound in batch:
            await guarded(inbound, CONSUMER, _forward)


async def _forward(inbound: Inbound) -> None:
    await emit(AGENT_MESSAGES_ACCEPTED, inbound.event)
