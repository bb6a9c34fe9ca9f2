"""Reading a chaos run as it happens: one read_committed consumer over the input topic and
every output topic (accepted, rejected, dead letters, decisions), kept for the whole run
(`Collector`), and the consumer group's assignment per worker (`GroupWatcher`), which
says whose partitions a kill takes away."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition

from tests.chaos.checker import (
    InputRecord,
    LlmResponseRecord,
    OutputRecord,
    parse_input,
    parse_llm_request,
    parse_llm_response,
    parse_output,
)

#: catalogue topic -> the checker's kind
OUTPUT_TOPICS = {
    "agent.messages.accepted": "accepted",
    "agent.messages.rejected": "rejected",
    "pipeline.deadletter": "deadletter",
    "security.decisions": "decision",
}
INPUT_TOPIC = "agent.messages"
#: how long `stop_task` waits: a poll returns within 200 ms, a group refresh within 5 s
STOP_WAIT_S = 10.0


async def stop_task(task: asyncio.Task[None] | None) -> BaseException | None:
    """Cancel `task` and wait for it, at most `STOP_WAIT_S`; its error, if it had one.

    A run's tear-down once hung for 20 minutes in `await task` after `task.cancel()`,
    until the runner got SIGTERM; and the run then went on as if nothing had been
    asked, because `suppress(CancelledError)` around that await swallowed the runner's
    own cancellation too. On Python 3.11 `asyncio.wait_for` can lose a cancellation
    that arrives as its inner call completes, and the task then loops on: the loops
    also end on a flag their `stop` sets before this. `asyncio.wait` never raises the
    awaited task's CancelledError, so a cancellation of the caller propagates."""
    if task is None:
        return None
    task.cancel()
    done, _ = await asyncio.wait({task}, timeout=STOP_WAIT_S)
    if not done:
        return RuntimeError(f"a reading task did not stop in {STOP_WAIT_S} s")
    return None if task.cancelled() else task.exception()


async def _reader(bootstrap: str, topics: list[str], timeout: float) -> AIOKafkaConsumer:
    """A read_committed consumer assigned every partition of `topics` (once they exist),
    from the beginning."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        enable_auto_commit=False,
        isolation_level="read_committed",
        max_partition_fetch_bytes=4 * 1024 * 1024,
        # an offset out of range raises (the poll keeps failing, the run does not drain)
        # instead of jumping past records the check would then never see
        auto_offset_reset="none",
    )
    await consumer.start()
    try:
        deadline = time.monotonic() + timeout
        tps: list[TopicPartition] = []
        for topic in topics:
            while True:
                parts = consumer.partitions_for_topic(topic)
                if parts:
                    tps += [TopicPartition(topic, p) for p in sorted(parts)]
                    break
                if time.monotonic() > deadline:
                    raise AssertionError(f"topic {topic} does not exist")
                await consumer._client.force_metadata_update()
                await asyncio.sleep(0.3)
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
    except BaseException:
        with contextlib.suppress(Exception):
            await consumer.stop()
        raise
    return consumer


class _Reading:
    """A reader kept for the whole run: its consumer and the task that polls it, handing
    each fetched batch to `_took`."""

    bootstrap: str
    _task: asyncio.Task[None] | None = None
    _consumer: AIOKafkaConsumer | None = None
    #: set by `stop`: the poll loop ends on it even if a cancellation is lost
    _stopping = False
    #: the last error of a poll (a broker restart: the consumer reconnects by itself)
    error: BaseException | None = None

    async def _read(self, topics: list[str], timeout: float) -> None:
        consumer = self._consumer = await _reader(self.bootstrap, topics, timeout)
        self._task = asyncio.create_task(self._poll(consumer))

    async def _poll(self, consumer: AIOKafkaConsumer) -> None:
        while not self._stopping:
            try:
                batch = await consumer.getmany(timeout_ms=200, max_records=5000)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # broker restart: the consumer reconnects by itself
                self.error = exc
                await asyncio.sleep(0.5)
                continue
            self._took(batch, time.time())

    def _took(self, batch: dict[TopicPartition, list[Any]], now: float) -> None:
        raise NotImplementedError

    async def caught_up(self, timeout: float) -> bool:
        """Wait until the reader has read every partition to its end as it is now (the
        last stable offset: read_committed), so that what the stopped workers committed
        last is checked too; False if it did not within `timeout`."""
        consumer = self._consumer
        if consumer is None:
            return False
        tps = list(consumer.assignment())
        deadline = time.monotonic() + timeout
        while True:
            try:
                # bounded: `position` waits for an offset reset that may never come
                async with asyncio.timeout(max(0.5, deadline - time.monotonic())):
                    ends = await consumer.end_offsets(tps)
                    behind = [tp for tp in tps if await consumer.position(tp) < ends[tp]]
            except Exception as exc:  # the broker still coming back: try again
                self.error, behind = exc, tps
            if not behind:
                return True
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.2)

    async def stop(self) -> None:
        """Stop polling and close the consumer, each wait bounded.

        The loop also ends on a flag, for a cancellation lost on its way (`stop_task`)."""
        task, self._task = self._task, None
        self._stopping = True
        error = await stop_task(task)
        if error is not None:
            self.error = error
        if self._consumer is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._consumer.stop(), 30)
            self._consumer = None


class Collector(_Reading):
    """Follows the input and output topics of one run from the beginning."""

    def __init__(self, bootstrap: str, prefix: str) -> None:
        self.bootstrap = bootstrap
        self.input_topic = f"{prefix}{INPUT_TOPIC}"
        self.kinds = {f"{prefix}{name}": kind for name, kind in OUTPUT_TOPICS.items()}
        self.inputs: list[InputRecord] = []
        self.outputs: list[OutputRecord] = []
        self.garbage: Counter[str] = Counter()
        self.input_ids: set[str] = set()
        self.decided_ids: set[str] = set()
        #: id -> its copies on the input topic, and its outcomes so far
        self.copies: Counter[str] = Counter()
        self.outcomes_of: Counter[str] = Counter()
        #: (partition, offset) of every decodable input record, and of those decided
        self.valid_records: set[tuple[int, int]] = set()
        self.decided_records: set[tuple[int, int]] = set()
        self._dead_sources: set[tuple[int | None, int | None]] = set()
        self._offset_id: dict[tuple[int, int], str] = {}
        self.last_record_at = 0.0

    async def start(self, timeout: float = 60) -> Collector:
        await self._read([self.input_topic, *self.kinds], timeout)
        return self

    def _took(self, batch: dict[TopicPartition, list[Any]], now: float) -> None:
        for tp, records in batch.items():
            if records:
                self.last_record_at = now
            if tp.topic == self.input_topic:
                for rec in records:
                    inp = parse_input(tp.partition, rec.offset, rec.value)
                    if inp is None:
                        self.garbage["input"] += 1
                        continue
                    self.inputs.append(inp)
                    self.input_ids.add(inp.id)
                    self.copies[inp.id] += 1
                    at = (inp.partition, inp.offset)
                    self._offset_id[at] = inp.id
                    if inp.poison is None:
                        self.valid_records.add(at)
                    if at in self._dead_sources:
                        self.outcomes_of[inp.id] += 1
                continue
            kind = self.kinds[tp.topic]
            for rec in records:
                out = parse_output(kind, tp.partition, rec.offset, rec.value, rec.timestamp, now)
                if out is None:
                    self.garbage[kind] += 1
                    continue
                self.outputs.append(out)
                self._note(out)

    def _note(self, out: OutputRecord) -> None:
        if out.kind == "deadletter":
            src = (out.source_partition, out.source_offset)
            self._dead_sources.add(src)
            ident = self._offset_id.get(src)  # type: ignore[arg-type]
            if ident is not None:
                self.outcomes_of[ident] += 1
        elif out.kind == "decision":
            if out.id is not None:
                self.decided_ids.add(out.id)
            if out.source_partition is not None and out.source_offset is not None:
                self.decided_records.add((out.source_partition, out.source_offset))
        elif out.id is not None:
            self.outcomes_of[out.id] += 1

    def pending(self, expected: int | None = None) -> int:
        """Input records seen without an outcome so far (per id: copies on the input
        topic less outcomes), or, when more, `expected` ids less those with theirs."""
        copies, outcomes = self.copies, self.outcomes_of
        missing = sum(n - outcomes[i] for i, n in copies.items() if outcomes[i] < n)
        if expected is not None:
            done = sum(1 for i, n in copies.items() if outcomes[i] >= n)
            missing = max(missing, expected - done)
        return missing

    def undecided(self) -> int:
        """Decodable input records without a decision naming them so far."""
        return len(self.valid_records - self.decided_records)

    def decisions(self) -> list[OutputRecord]:
        return [o for o in self.outputs if o.kind == "decision"]


LLM_REQUESTS = "llm.requests"
LLM_RESPONSES = "llm.responses"
DEADLETTER = "pipeline.deadletter"


class LlmCollector(_Reading):
    """Follows `llm.requests`, `llm.responses` and the dead letters of requests (those
    whose source topic is `llm.requests`) of one run from the beginning, read_committed.
    `llm.chunks` is not read: the checker judges final responses only."""

    def __init__(self, bootstrap: str, prefix: str) -> None:
        self.bootstrap = bootstrap
        self.request_topic = f"{prefix}{LLM_REQUESTS}"
        self.response_topic = f"{prefix}{LLM_RESPONSES}"
        self.deadletter_topic = f"{prefix}{DEADLETTER}"
        self.requests: list[InputRecord] = []
        self.responses: list[LlmResponseRecord] = []
        self.dead_letters: list[OutputRecord] = []
        self.request_ids: set[str] = set()
        #: request ids with a final response or a dead letter
        self.ended_ids: set[str] = set()
        self.garbage: Counter[str] = Counter()
        self.first_response_at = 0.0
        self.last_response_at = 0.0
        self._offset_id: dict[tuple[int, int], str] = {}
        self._dead_sources: set[tuple[int | None, int | None]] = set()

    async def start(self, timeout: float = 60) -> LlmCollector:
        await self._read([self.request_topic, self.response_topic, self.deadletter_topic], timeout)
        return self

    def _took(self, batch: dict[TopicPartition, list[Any]], now: float) -> None:
        for tp, records in batch.items():
            for rec in records:
                self._take(tp.topic, tp.partition, rec.offset, rec.value, rec.timestamp, now)

    def _take(
        self, topic: str, partition: int, offset: int, value: bytes | None, ts: int, now: float
    ) -> None:
        if topic == self.request_topic:
            req = parse_llm_request(partition, offset, value)
            if req is None:
                self.garbage["llm.requests"] += 1
                return
            self.requests.append(req)
            self.request_ids.add(req.id)
            self._offset_id[(partition, offset)] = req.id
            if (partition, offset) in self._dead_sources:
                self.ended_ids.add(req.id)
        elif topic == self.response_topic:
            resp = parse_llm_response(partition, offset, value, ts, now)
            if resp is None:
                self.garbage["llm.responses"] += 1
                return
            self.responses.append(resp)
            self.ended_ids.add(resp.request_id)
            self.first_response_at = self.first_response_at or now
            self.last_response_at = now
        else:
            dead = parse_output("deadletter", partition, offset, value, ts, now)
            if dead is None or dead.source_topic != self.request_topic:
                return
            self.dead_letters.append(dead)
            src = (dead.source_partition, dead.source_offset)
            self._dead_sources.add(src)
            ident = self._offset_id.get(src)  # type: ignore[arg-type]
            if ident is not None:
                self.ended_ids.add(ident)

    def pending(self, expected: int) -> int:
        """Requests (at least `expected`) without a final response or dead letter yet."""
        done = len(self.request_ids & self.ended_ids)
        return max(len(self.request_ids) - done, expected - done)


class GroupWatcher:
    """The worker group's current assignment of the input topic, per worker web port
    (Faust puts each member's URL, with its web port, in its group metadata)."""

    def __init__(self, bootstrap: str, group: str, input_topic: str) -> None:
        self.bootstrap = bootstrap
        self.group = group
        self.input_topic = input_topic
        #: web port -> input partitions, from the last stable (non-empty) description
        self.by_port: dict[int, frozenset[int]] = {}
        self.state = ""
        self.generation_changes = 0
        self._task: asyncio.Task[None] | None = None
        self._admin: Any = None
        self._stopping = False

    async def start(self) -> GroupWatcher:
        from aiokafka.admin import AIOKafkaAdminClient

        self._admin = AIOKafkaAdminClient(bootstrap_servers=self.bootstrap)
        await self._admin.start()
        self._task = asyncio.create_task(self._loop())
        return self

    async def _loop(self) -> None:
        while not self._stopping:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.refresh(), 5)
            await asyncio.sleep(1.0)

    async def refresh(self) -> None:
        from aiokafka.coordinator.protocol import (
            ConsumerProtocolMemberAssignment,
            ConsumerProtocolMemberMetadata,
        )

        responses = await self._admin.describe_consumer_groups([self.group])
        for resp in responses:
            for group in resp.groups:
                state, members = group[2], group[5]
                self.state = state
                found: dict[int, frozenset[int]] = {}
                for member in members:
                    meta_raw, assign_raw = member[3], member[4]
                    if not assign_raw:
                        continue
                    meta = ConsumerProtocolMemberMetadata.decode(meta_raw)
                    url = str(orjson.loads(meta.user_data).get("url", ""))
                    port = int(url.rstrip("/").rsplit(":", 1)[-1])
                    assign = ConsumerProtocolMemberAssignment.decode(assign_raw)
                    parts = frozenset(
                        p for t, ps in assign.assignment if t == self.input_topic for p in ps
                    )
                    found[port] = parts
                if state == "Stable" and found and found != self.by_port:
                    self.generation_changes += 1
                    self.by_port = found

    def partitions(self, port: int) -> frozenset[int]:
        return self.by_port.get(port, frozenset())

    async def stop(self) -> None:
        task, self._task = self._task, None
        self._stopping = True
        await stop_task(task)
        if self._admin is not None:
            with contextlib.suppress(Exception):
                await self._admin.close()
