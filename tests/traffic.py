"""Demo-like traffic for tests that watch the pipeline live (the console's): heartbeats
from simulated agents (some of which a test silences), messages — some denied, some
undecodable, one undecodable record carrying a secret — and LLM requests to the offline
`local` provider, until told to stop."""

from __future__ import annotations

import asyncio
import itertools
import random
import uuid
from collections import Counter
from dataclasses import dataclass, field

from agentstream.schemas import AgentMessage, Event, Heartbeat, LLMRequest, utc_now
from agentstream.schemas.llm import ChatMessage, LLMConfig, LLMContext
from agentstream.streams.client import AsyncClient
from agentstream.streams.settings import Settings

#: the bytes of the undecodable record with a secret: the console must show it redacted
SECRET = "s3cr3t-never-shown"
SECRET_RECORD = b'{"type": "agent.message", "payload": {"token": "' + SECRET.encode() + b'", "oo'


@dataclass
class Traffic:
    agents: list[str]
    rate: float = 20.0
    #: agents that send no heartbeat (a test adds one to make it go down)
    silent: set[str] = field(default_factory=set)
    sent: Counter[str] = field(default_factory=Counter)
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def run(self, settings: Settings) -> None:
        rng = random.Random(3)
        async with AsyncClient(settings, source="traffic") as client:
            for tick in itertools.count():
                if self.stop.is_set():
                    return
                if tick % max(1, int(self.rate / 2)) == 0:  # heartbeats twice a second
                    for agent_id in self.agents:
                        if agent_id not in self.silent:
                            await client.publish(
                                "agent.heartbeats",
                                Heartbeat(agent_id=agent_id, sent_at=utc_now(), sequence=tick),
                                wait=False,
                            )
                await self._message(client, rng, tick)
                if tick % int(self.rate) == 0:  # an LLM request a second
                    await client.publish(
                        "llm.requests",
                        LLMRequest(
                            request_id=uuid.uuid4().hex,
                            agent_id=rng.choice(self.agents),
                            provider="local",
                            stream=True,
                            context=LLMContext(
                                messages=[ChatMessage(role="user", content="Tell me a story.")]
                            ),
                            config=LLMConfig(max_tokens=24),
                        ),
                        wait=False,
                    )
                    self.sent["llm"] += 1
                await asyncio.sleep(1 / self.rate)

    async def _message(self, client: AsyncClient, rng: random.Random, tick: int) -> None:
        sender, recipient = rng.sample(self.agents, 2)
        if tick % 25 == 7:
            raw = SECRET_RECORD if tick % 50 == 7 else b'{"type": "agent.message", "oops'
            await client.publish_raw("agent.messages", raw, sender.encode())
            self.sent["undecodable"] += 1
            return
        roll = rng.random()
        content = "password: hunter2" if roll < 0.2 else "status update: task done"
        level = "ultra-secret" if roll > 0.9 else "standard"  # unknown level: denied
        msg = AgentMessage(
            message_id=uuid.uuid4().hex,
            sender_id=sender,
            recipient_id=recipient,
            security_level=level,
            content=content,
        )
        await client.publish("agent.messages", Event.of(msg, source=sender), wait=False)
        self.sent["messages"] += 1
