"""Continuous load for a chaos run: `agent.message` inputs for `enforce_policy` at a set
rate, from a producer task that survives broker restarts (a failed send is sent again, the
checker then sees two input copies), with an optional share of poison records.

Every input carries its id: a valid message as its `message_id` (`<tag>.<n>`), a poison
record marked `chaos-id=<tag>.<n>.<kind>` in its bytes (it has no decodable id).

`LlmLoad` is the same producer for `llm.request` events (`call_llm`'s input), each with
its request id `<tag>.llm.<n>`, keyed by it as the project's client keys them."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiokafka import AIOKafkaProducer

from agentstream.schemas import AgentMessage, Event, encode, utc_now
from agentstream.schemas.health import Heartbeat
from agentstream.schemas.llm import ChatMessage, LLMConfig, LLMContext, LLMRequest
from tests.chaos.checker import BLOCKED_WORD, POISON_KINDS, REJECT_EVERY, REJECTED_AT


def input_record(tag: str, n: int, poison_every: int = 0, senders: int = 24) -> tuple[bytes, bytes]:
    """(key, value) of input number n; every `poison_every`-th one is poison, of the three
    kinds in turn (undecodable bytes, an event of the wrong type, a schema-invalid one)."""
    sender = f"agent-{n % senders}"
    key = sender.encode()
    if poison_every and n % poison_every == poison_every - 1:
        kind = POISON_KINDS[(n // poison_every) % len(POISON_KINDS)]
        ident = f"{tag}.{n}.{kind}"
        mark = f"chaos-id={ident}"
        if kind == "undecodable":
            return key, b'{"type": "agent.message", "payload": "' + mark.encode()
        if kind == "wrongtype":
            beat = Heartbeat(agent_id=sender, sent_at=utc_now(), info={"chaos": mark})
            return key, encode(Event.of(beat, source=mark))
        return key, orjson.dumps(
            {"type": "agent.message", "schema_version": 2, "source": mark, "payload": {"x": n}}
        )
    content = f"message {n} from {sender}"
    if n % REJECT_EVERY == REJECTED_AT:
        content += f" {BLOCKED_WORD}"
    msg = AgentMessage(
        message_id=f"{tag}.{n}", sender_id=sender, recipient_id="hub", content=content
    )
    return key, encode(Event.of(msg, source=sender))


@dataclass
class Load:
    """Sends `total` inputs to `topic` at `rate` per second (0: as fast as acks allow)."""

    bootstrap: str
    topic: str
    total: int
    rate: float
    tag: str
    poison_ratio: float = 0.0
    window: int = 2000
    #: inputs handed to the producer so far (what fault triggers follow)
    issued: int = 0
    acked: int = 0
    resent: int = 0
    send_errors: list[str] = field(default_factory=list)
    started_at: float = 0.0
    finished_at: float = 0.0
    #: ids of inputs whose sends kept failing until the deadline
    unsent: int = 0
    extra: dict[str, Any] = field(default_factory=dict)
    _progress: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def poison_every(self) -> int:
        return round(1 / self.poison_ratio) if self.poison_ratio > 0 else 0

    def record(self, n: int) -> tuple[bytes, bytes]:
        return input_record(self.tag, n, self.poison_every)

    async def reached(self, fraction: float) -> None:
        """Returns once that fraction of the inputs was handed to the producer."""
        want = min(self.total, max(0, int(self.total * fraction)))
        while self.issued < want:
            self._progress.clear()
            await self._progress.wait()

    async def run(self, deadline_s: float = 900.0) -> None:
        producer = AIOKafkaProducer(
            bootstrap_servers=self.bootstrap,
            acks="all",
            enable_idempotence=True,
            linger_ms=5,
            request_timeout_ms=15_000,
            retry_backoff_ms=250,
        )
        await self._start(producer, deadline_s)
        self.started_at = time.time()
        t0 = time.monotonic()
        pending: deque[tuple[int, asyncio.Future[Any]]] = deque()
        retry: deque[int] = deque()
        try:
            n = 0
            while n < self.total or pending or retry:
                if time.monotonic() - t0 > deadline_s:
                    self.unsent = len(pending) + len(retry) + (self.total - n)
                    break
                # settle what is done at the head of the window
                while pending and (pending[0][1].done() or len(pending) >= self.window):
                    i, fut = pending.popleft()
                    try:
                        await fut
                        self.acked += 1
                    except Exception as exc:  # broker gone, timeout: send it again
                        self._error(exc)
                        retry.append(i)
                if retry:
                    i = retry.popleft()
                    self.resent += 1
                    pending.append((i, await self._send(producer, i)))
                    continue
                if n < self.total:
                    if self.rate > 0:
                        ahead = t0 + n / self.rate - time.monotonic()
                        if ahead > 0:
                            await asyncio.sleep(ahead)
                    pending.append((n, await self._send(producer, n)))
                    n += 1
                    self.issued = n
                    self._progress.set()
                elif pending:
                    await asyncio.wait([pending[0][1]], timeout=1.0)
        finally:
            self.finished_at = time.time()
            self.issued = self.total
            self._progress.set()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(producer.stop(), 30)

    async def _start(self, producer: AIOKafkaProducer, deadline_s: float) -> None:
        t0 = time.monotonic()
        while True:
            try:
                await producer.start()
                return
            except Exception as exc:
                self._error(exc)
                if time.monotonic() - t0 > deadline_s:
                    raise
                await asyncio.sleep(1.0)

    async def _send(self, producer: AIOKafkaProducer, i: int) -> asyncio.Future[Any]:
        key, value = self.record(i)
        while True:
            try:
                return await producer.send(self.topic, value=value, key=key)
            except Exception as exc:  # e.g. metadata unavailable while the broker is down
                self._error(exc)
                await asyncio.sleep(0.5)

    def _error(self, exc: BaseException) -> None:
        if len(self.send_errors) < 20:
            self.send_errors.append(f"{type(exc).__name__}: {exc}"[:300])


#: the model name of the chaos LLM requests (the loopback server answers any)
LLM_MODEL = "loop-model"


def llm_request_record(tag: str, n: int, provider: str, senders: int = 24) -> tuple[bytes, bytes]:
    """(key, value) of LLM request number n: an `llm.request` event, keyed by its request
    id (`Event.key`, as `streams.client.AsyncClient.publish` keys it); streamed and
    non-streamed in turn."""
    request = LLMRequest(
        request_id=f"{tag}.llm.{n}",
        agent_id=f"agent-{n % senders}",
        provider=provider,
        stream=n % 2 == 0,
        context=LLMContext(messages=[ChatMessage(role="user", content=f"chaos question {n}")]),
        config=LLMConfig(model=LLM_MODEL, max_tokens=32),
    )
    event = Event.of(request, source="chaos-load")
    return event.key.encode(), encode(event)


@dataclass
class LlmLoad(Load):
    """`total` LLM requests to `topic` (the run's `llm.requests`) at `rate` per second,
    for `provider`."""

    provider: str = "local"

    def record(self, n: int) -> tuple[bytes, bytes]:
        return llm_request_record(self.tag, n, self.provider)
