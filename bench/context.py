"""What every benchmark stage shares: the broker, isolated environments, fast producing,
cheap output counting and worker subprocesses.

Stages measure throughput, so the helpers here must not be the bottleneck: producing
goes through aiokafka's batch API (no per-message await), and progress is observed by
summing partition END OFFSETS (one ListOffsets request per poll) instead of consuming
the output.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import psutil
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import NewTopic
from aiokafka.errors import TopicAlreadyExistsError
from aiokafka.partitioner import DefaultPartitioner

from agentstream.schemas import AgentMessage, Event, registry
from agentstream.streams.kafka_security import new_admin, new_consumer, new_producer
from agentstream.streams.settings import Settings, child_environ

REPO = Path(__file__).resolve().parent.parent

#: Distinct sender ids (= Kafka keys): enough that keys spread over every partition.
SENDERS = 97


def log(msg: str) -> None:
    """Progress for humans goes to stderr; stdout's last line is the JSON result."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Throughput:
    """How a stage's output grew: first seen, and when it reached the target.

    The rate counts only what happened between the first and the last observation, so
    worker start-up, group join and the first fetch are excluded.
    """

    target: int
    t_first: float
    count_first: int
    t_done: float
    #: the watched worker's CPU seconds (user + system, all its threads) at the first
    #: and the last observation, when a worker was watched
    cpu_first: float | None = None
    cpu_done: float | None = None

    @property
    def eps(self) -> float:
        span = self.t_done - self.t_first
        done = self.target - self.count_first
        if span <= 0 or done <= 0:
            raise BenchError(
                f"output grew too fast to time ({done} events in {span:.4f}s): raise --events"
            )
        return done / span

    @property
    def cpu_us(self) -> float | None:
        """The worker's CPU time per event over the timed span, in µs: what the work
        costs, which a busy shared machine changes far less than the rate."""
        done = self.target - self.count_first
        if self.cpu_first is None or self.cpu_done is None or done <= 0:
            return None
        return (self.cpu_done - self.cpu_first) / done * 1e6

    @property
    def busy(self) -> float | None:
        """The worker's CPU seconds per second of the timed span: well below 1.0 it was
        waiting (on the broker, on I/O); near 1.0 it was busy, in Python or (a runner on
        librdkafka) partly in the client's own threads."""
        span = self.t_done - self.t_first
        if self.cpu_first is None or self.cpu_done is None or span <= 0:
            return None
        return (self.cpu_done - self.cpu_first) / span


def cpu_keys(name: str, measured: Throughput) -> dict[str, float]:
    """``<name>_cpu_us`` and ``<name>_busy`` of a watched worker (none if it was not)."""
    if measured.cpu_us is None or measured.busy is None:
        return {}
    return {f"{name}_cpu_us": round(measured.cpu_us, 1), f"{name}_busy": round(measured.busy, 2)}


def cpu_text(measured: Throughput) -> str:
    if measured.cpu_us is None or measured.busy is None:
        return ""
    return f", {measured.cpu_us:.1f} µs CPU/event, {measured.busy:.0%} busy"


class BenchError(RuntimeError):
    """A stage could not produce a measurement."""


class Worker:
    """A pipeline (or other Faust) worker subprocess with its log in a file."""

    def __init__(self, env: dict[str, str], log_path: Path, argv: Sequence[str]) -> None:
        self.env = env
        self.log_path = log_path
        self.argv = list(argv)
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: Any = None

    def start(self) -> Worker:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            self.argv,
            env=self.env,
            cwd=REPO,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        return self

    def ready(self) -> bool:
        """Faust logs this once the worker runs its agents."""
        self.check_alive()
        try:
            return "[^Worker]: Ready" in self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return False

    async def wait_ready(self, timeout: float = 90.0) -> float:  # noqa: ASYNC109
        deadline = time.monotonic() + timeout
        while not self.ready():
            if time.monotonic() > deadline:
                raise BenchError(f"worker not ready after {timeout}s:\n{self.tail()}")
            await asyncio.sleep(0.05)
        return time.monotonic()

    def cpu_s(self) -> float | None:
        """CPU seconds the running process has used (user + system, every thread)."""
        if self.proc is None or self.proc.poll() is not None:
            return None
        try:
            times = psutil.Process(self.proc.pid).cpu_times()
        except psutil.Error:
            return None
        return float(times.user + times.system)

    def check_alive(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise BenchError(f"worker exited with {self.proc.returncode}:\n{self.tail()}")

    def tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except FileNotFoundError:
            return ""

    def stop(self, timeout: float = 20.0) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        if self._log is not None:
            self._log.close()
            self._log = None


#: variables a secured cluster needs, passed on to every worker the bench starts
CONNECTION_VARS = (
    "AGENTSTREAM_KAFKA_SECURITY_PROTOCOL",
    "AGENTSTREAM_KAFKA_SASL_",
    "AGENTSTREAM_KAFKA_SSL_",
    "AGENTSTREAM_KAFKA_CONNECT_TIMEOUT_S",
    "AGENTSTREAM_SECRET",  # _SOURCES, _<ENTRY> and SECRETS_DIR
    "AGENTSTREAM_KEYRING_",
)


def _connection_settings(bootstrap: str) -> Settings:
    env = {k: v for k, v in os.environ.items() if k.startswith(CONNECTION_VARS)}
    return Settings.from_env({**env, "AGENTSTREAM_KAFKA_BOOTSTRAP": bootstrap})


class BenchContext:
    """One benchmark run: broker address, sizes, results so far, and helpers."""

    def __init__(
        self,
        bootstrap: str,
        events: int = 200_000,
        payload_bytes: int = 300,
        partitions: int = 4,
        work_dir: Path | None = None,
        guarantee: str = "at_least_once",
    ) -> None:
        self.bootstrap = bootstrap
        #: the workers' processing guarantee (`--guarantee`)
        self.guarantee = guarantee
        #: how the harness's own clients connect (TLS/SASL from AGENTSTREAM_KAFKA_*)
        self.settings = _connection_settings(bootstrap)
        self.events = events
        self.payload_bytes = payload_bytes
        self.partitions = partitions
        self.results: dict[str, float | str] = {}
        self.run_id = uuid.uuid4().hex[:8]
        self.work_dir = work_dir or (REPO / "var" / "bench" / self.run_id)
        self._payloads: list[bytes] | None = None
        self._keys: list[bytes] | None = None
        self._n_env = 0
        self.workers: list[Worker] = []

    # -- environments --------------------------------------------------------------------
    def new_env(self, **extra_env: str) -> dict[str, str]:
        """An environment isolated from every other stage and run: own topic prefix,
        app id (consumer group), data dir and web port."""
        self._n_env += 1
        ns = f"b{self.run_id}x{self._n_env}"
        self.work_dir.mkdir(parents=True, exist_ok=True)  # stages keep files there
        env = child_environ(os.environ)
        # a secured cluster: the workers connect as the harness does
        env.update({k: v for k, v in os.environ.items() if k.startswith(CONNECTION_VARS)})
        env.update(
            {
                "AGENTSTREAM_KAFKA_BOOTSTRAP": self.bootstrap,
                "AGENTSTREAM_PROCESSING_GUARANTEE": self.guarantee,
                "AGENTSTREAM_TOPIC_PREFIX": f"{ns}.",
                "AGENTSTREAM_APP_ID": f"{ns}-app",
                "AGENTSTREAM_DATA_DIR": str(self.work_dir / ns),
                "AGENTSTREAM_WEB_PORT": str(free_port()),
                "AGENTSTREAM_TOPIC_PARTITIONS": str(self.partitions),
                "AGENTSTREAM_STANDBY_REPLICAS": "0",
                "AGENTSTREAM_LOG_LEVEL": "WARNING",
                "PYTHONPATH": os.pathsep.join(
                    p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p
                ),
            }
        )
        env.update(extra_env)
        return env

    @staticmethod
    def topic(env: dict[str, str], name: str) -> str:
        return f"{env.get('AGENTSTREAM_TOPIC_PREFIX', '')}{name}"

    async def ensure_topics(self, env: dict[str, str]) -> None:
        """Every catalogue topic under env's prefix (what a worker would create)."""
        from agentstream.streams.admin import ensure_topics

        await ensure_topics(Settings.from_env(env))

    async def create_topic(self, name: str, partitions: int | None = None) -> None:
        """A plain topic outside the catalogue (the broker does not auto-create)."""
        admin = new_admin(self.settings, "bench")
        await admin.start()
        try:
            with contextlib.suppress(TopicAlreadyExistsError):
                await admin.create_topics(
                    [NewTopic(name, partitions or self.partitions, replication_factor=1)]
                )
            deadline = time.monotonic() + 30
            while name not in await admin.list_topics():
                if time.monotonic() > deadline:
                    raise BenchError(f"topic {name} not visible")
                await asyncio.sleep(0.1)
        finally:
            await admin.close()

    # -- data ----------------------------------------------------------------------------
    def make_payloads(self, n: int) -> list[bytes]:
        """n valid `agent.message` events of about `payload_bytes` each.

        One event goes through the real model and encoder; the rest are copies with
        fresh ids (building 200k pydantic models would take longer than a stage).
        """
        event = Event.of(
            AgentMessage(message_id="m", sender_id="agent-0", recipient_id="agent-x", content=""),
            source="bench",
        )
        # Fields left at their defaults are omitted, as a lean producer would: the
        # decoder fills them in, and ~300 B stays reachable.
        template = event.model_dump(mode="json", exclude_defaults=True)
        template.update(type=event.type, schema_version=event.schema_version)
        template["payload"]["content"] = ""
        # size it with ids as long as the typical ones written below
        template["payload"].update(message_id=f"m{n // 2}", sender_id=f"agent-{SENDERS // 2}")
        base = len(orjson.dumps(template))
        template["payload"]["content"] = "x" * max(0, self.payload_bytes - base)
        payload = template["payload"]
        out: list[bytes] = []
        for i in range(n):
            eid = str(uuid.uuid4())
            out.append(
                orjson.dumps(
                    {
                        **template,
                        "event_id": eid,
                        "correlation_id": eid,
                        "payload": {
                            **payload,
                            "message_id": f"m{i}",
                            "sender_id": f"agent-{i % SENDERS}",
                        },
                    }
                )
            )
        if out:
            registry.decode(out[0])  # the copies must stay valid events
        return out

    def payloads(self) -> tuple[list[bytes], list[bytes]]:
        """The run's events and keys (sender ids), built once and shared by stages."""
        if self._payloads is None or self._keys is None:
            self._payloads = self.make_payloads(self.events)
            self._keys = [f"agent-{i % SENDERS}".encode() for i in range(self.events)]
        return self._payloads, self._keys

    async def produce(
        self, topic_full: str, values: list[bytes], keys: list[bytes] | None = None
    ) -> float:
        """Write values as fast as aiokafka allows; returns the rate (events/s).

        Records are partitioned like Faust's producer would (murmur2 of the key) and
        packed into per-partition batches sent without awaiting each message.
        """
        producer = new_producer(
            self.settings,
            "bench",
            acks=1,
            linger_ms=20,
            max_batch_size=1024 * 1024,
            max_request_size=4 * 1024 * 1024,
        )
        await producer.start()
        t0 = time.monotonic()
        try:
            parts = sorted(await producer.partitions_for(topic_full))
            partitioner = DefaultPartitioner()
            batches: dict[int, Any] = {}
            pending: list[asyncio.Future[Any]] = []
            for i, value in enumerate(values):
                key = keys[i] if keys is not None else None
                p = partitioner(key, parts, parts) if key is not None else parts[i % len(parts)]
                batch = batches.get(p)
                if batch is None:
                    batch = batches[p] = producer.create_batch()
                if batch.append(key=key, value=value, timestamp=None) is None:
                    pending.append(await producer.send_batch(batch, topic_full, partition=p))
                    batch = batches[p] = producer.create_batch()
                    batch.append(key=key, value=value, timestamp=None)
            for p, batch in batches.items():
                if batch.record_count():
                    pending.append(await producer.send_batch(batch, topic_full, partition=p))
            await asyncio.gather(*pending)
        finally:
            await producer.stop()
        return len(values) / max(time.monotonic() - t0, 1e-9)

    # -- observing output -----------------------------------------------------------------
    async def count(self, topic_full: str) -> int:
        """Records in a topic (sum of partition end offsets)."""
        consumer = await self._offsets_consumer()
        tps = await _tps(consumer, topic_full)
        return sum((await consumer.end_offsets(tps)).values())

    async def count_committed(self, topic_full: str, timeout: float = 120.0) -> int:  # noqa: ASYNC109
        """Records a read_committed reader gets from a topic. Under exactly-once the end
        offsets (`count`) also count transaction markers and aborted records, so the
        records are read."""
        consumer = new_consumer(
            self.settings, "bench", enable_auto_commit=False, isolation_level="read_committed"
        )
        await consumer.start()
        try:
            tps = await _tps(consumer, topic_full)
            consumer.assign(tps)
            await consumer.seek_to_beginning(*tps)
            ends = await consumer.end_offsets(tps)  # the last stable offsets
            deadline = time.monotonic() + timeout
            n = 0
            for tp in tps:
                while await consumer.position(tp) < ends[tp]:
                    if time.monotonic() > deadline:
                        raise BenchError(f"reading {topic_full} took over {timeout:.0f}s")
                    got = await consumer.getmany(tp, timeout_ms=500)
                    n += sum(len(records) for records in got.values())
            return n
        finally:
            await consumer.stop()

    async def wait_for_count(
        self,
        topic_full: str,
        n: int,
        timeout: float,  # noqa: ASYNC109 - the harness's published signature
    ) -> float:
        """time.monotonic() at which the topic first held ≥ n records."""
        return (await self.watch_count(topic_full, n, timeout)).t_done

    async def watch_count(
        self,
        topic_full: str,
        n: int,
        timeout: float,  # noqa: ASYNC109
        *,
        interval: float = 0.02,
        worker: Worker | None = None,
    ) -> Throughput:
        """Poll the topic's end offsets until ≥ n records; note when output first
        appeared so that start-up is excluded from the rate."""
        consumer = await self._offsets_consumer()
        tps = await _tps(consumer, topic_full)
        deadline = time.monotonic() + timeout
        t_first: float | None = None
        count_first = 0
        cpu_first: float | None = None
        while True:
            total = sum((await consumer.end_offsets(tps)).values())
            now = time.monotonic()
            if total > 0 and t_first is None:
                t_first, count_first = now, total
                cpu_first = worker.cpu_s() if worker is not None else None
            if total >= n:
                assert t_first is not None
                cpu_done = worker.cpu_s() if worker is not None else None
                return Throughput(n, t_first, count_first, now, cpu_first, cpu_done)
            if now > deadline:
                raise BenchError(f"{topic_full} holds {total} of {n} records after {timeout}s")
            if worker is not None:
                worker.check_alive()
            await asyncio.sleep(interval)

    _offsets: AIOKafkaConsumer | None = None

    async def _offsets_consumer(self) -> AIOKafkaConsumer:
        if self._offsets is None:
            self._offsets = new_consumer(self.settings, "bench", enable_auto_commit=False)
            await self._offsets.start()
        return self._offsets

    # -- workers -------------------------------------------------------------------------
    def start_worker(self, env: dict[str, str], *extra: str) -> Worker:
        """`agentstream worker` (the real pipeline worker) under env."""
        return self.start_process(env, "-m", "agentstream", "worker", "--loglevel", "info", *extra)

    def start_process(
        self, env: dict[str, str], *python_args: str, python: str | Path | None = None
    ) -> Worker:
        """`python *python_args` under env; python is this interpreter unless given (the
        peers stage runs its own virtualenv's)."""
        name = f"{env.get('AGENTSTREAM_APP_ID', 'proc')}-{len(self.workers)}.log"
        argv = [str(python or sys.executable), *python_args]
        worker = Worker(env, self.work_dir / name, argv).start()
        self.workers.append(worker)
        return worker

    async def close(self) -> None:
        """Stop the workers and delete every topic of this run (a default run writes a
        few hundred MB the dev broker should not keep)."""
        for worker in self.workers:
            worker.stop()
        if self._offsets is not None:
            await self._offsets.stop()
            self._offsets = None
        try:
            await self.delete_topics()
        except Exception as exc:  # cleanup must not hide the results
            log(f"could not delete this run's topics: {exc!r}")

    async def delete_topics(self) -> list[str]:
        ours = f"b{self.run_id}x"  # every prefix and app id new_env hands out
        admin = new_admin(self.settings, "bench")
        await admin.start()
        try:
            names = [t for t in await admin.list_topics() if t.startswith(ours)]
            if names:
                await admin.delete_topics(names)
            return names
        finally:
            await admin.close()


async def _tps(consumer: AIOKafkaConsumer, topic: str) -> list[TopicPartition]:
    deadline = time.monotonic() + 30.0
    while True:
        parts = consumer.partitions_for_topic(topic)
        if parts:
            return [TopicPartition(topic, p) for p in sorted(parts)]
        if time.monotonic() > deadline:
            raise BenchError(f"topic {topic} does not exist")
        await consumer._client.force_metadata_update()
        await asyncio.sleep(0.1)
