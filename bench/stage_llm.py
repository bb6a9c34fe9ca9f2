"""The call_llm stage against the loopback LLM server, 200 requests in flight.

Baseline: the same 200 streaming chat completions fired at once straight at the server
with httpx. Pipeline: 200 `LLMRequest`s produced at once to `llm.requests`; a worker
running only `agents.llm` streams every delta to `llm.chunks` and seals one response per
request on `llm.responses`, where a consumer in this process notes when each arrives.

``llm_added_p50_ms`` / ``llm_added_p99_ms`` = percentile of (response seen - request
produced) minus the same percentile of the direct httpx latency; ``llm_rps`` = requests
per second through the pipeline (first produce to last response, summed over rounds).
Several rounds after a warm-up of both sides, so connection set-up and group join are
excluded; direct and pipeline rounds alternate, so both see the same load on a shared
machine. The direct client reads each stream to its end as raw bytes (the cheapest way
with httpx), leasing connections from the same `ClientPool` as the provider.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import statistics
import subprocess
import sys
import time
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import orjson
import psutil
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from agents.llm.providers._http import ClientPool
from bench.context import REPO, BenchContext, BenchError, free_port, log
from schemas import Event, encode
from schemas.llm import ChatMessage, LLMConfig, LLMContext, LLMRequest
from streams.topics import LLM_REQUESTS, LLM_RESPONSES

NAME = "llm"
IN_FLIGHT = 200
ROUNDS = 4
#: sequential single requests (each side) measuring the pipeline's fixed added latency
SINGLES = 20
WORDS = [f"w{i}" for i in range(8)]
CHUNK_DELAY_S = 0.005


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def direct_round(pool: ClientPool, url: str, n: int = IN_FLIGHT) -> list[float]:
    """200 streaming completions at once, straight with httpx (leasing connections like
    the provider does, so the baseline does not suffer httpcore's burst serialisation)."""
    body = {
        "model": "bench",
        "stream": True,
        "stream_options": {"include_usage": True},
        "messages": [{"role": "user", "content": "hello"}],
    }

    async def one() -> float:
        t0 = time.perf_counter()
        async with pool.lease() as client, client.stream("POST", url, json=body) as resp:
            # to the end, like the provider, so the connection is reused; raw bytes, the
            # cheapest way to read it (the provider parses every event: the baseline
            # never does more work than the pipeline)
            async for _data in resp.aiter_bytes():
                pass
        return time.perf_counter() - t0

    return list(await asyncio.gather(*(one() for _ in range(n))))


class ResponseWatch:
    """Notes the wall time each request id's final response is seen."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        self.bootstrap, self.topic = bootstrap, topic
        self.seen: dict[str, float] = {}
        #: each response's own latency_ms (admission to final outcome, inside the worker)
        self.call_ms: list[float] = []
        self.built: dict[str, float] = {}
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self.consumer = AIOKafkaConsumer(
            bootstrap_servers=self.bootstrap, enable_auto_commit=False, fetch_max_wait_ms=5
        )
        await self.consumer.start()
        parts = self.consumer.partitions_for_topic(self.topic)
        while not parts:
            await self.consumer._client.force_metadata_update()
            parts = self.consumer.partitions_for_topic(self.topic)
        tps = [TopicPartition(self.topic, p) for p in sorted(parts)]
        self.consumer.assign(tps)
        await self.consumer.seek_to_end(*tps)
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while True:
            batch = await self.consumer.getmany(timeout_ms=50)
            now = time.time()
            for records in batch.values():
                for rec in records:
                    payload = orjson.loads(rec.value)["payload"]
                    self.seen.setdefault(payload["request_id"], now)
                    self.call_ms.append(float(payload["latency_ms"]))
                    built = orjson.loads(rec.value)["occurred_at"]
                    self.built[payload["request_id"]] = datetime.fromisoformat(built).timestamp()
                    if payload["status"] != "completed":
                        raise BenchError(f"request {payload['request_id']}: {payload['status']}")

    async def wait(self, ids: list[str], within_s: float) -> None:
        deadline = time.monotonic() + within_s
        while any(i not in self.seen for i in ids):
            if self._task is not None and self._task.done():
                self._task.result()
            if time.monotonic() > deadline:
                missing = sum(i not in self.seen for i in ids)
                raise BenchError(f"{missing} of {len(ids)} responses missing after {within_s}s")
            await asyncio.sleep(0.005)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        await self.consumer.stop()


def requests(n: int) -> list[Event[Any]]:
    run = uuid.uuid4().hex[:8]
    return [
        Event.of(
            LLMRequest(
                request_id=f"{run}-{i}",
                agent_id=f"bench-{i % 16}",
                provider="loop",
                context=LLMContext(messages=[ChatMessage(role="user", content="hello")]),
                config=LLMConfig(model="bench"),
            ),
            source="bench",
        )
        for i in range(n)
    ]


async def pipeline_round(
    producer: AIOKafkaProducer, topic: str, watch: ResponseWatch, n: int = IN_FLIGHT
) -> list[float]:
    """`n` requests sent at once through an already-started producer (starting one per
    round would count the producer's own metadata round trips as pipeline latency)."""
    events = requests(n)
    payloads = [(e.key.encode(), encode(e)) for e in events]
    sent = time.time()
    futures = [await producer.send(topic, value, key=key) for key, value in payloads]
    await asyncio.gather(*futures)
    ids = [e.payload.request_id for e in events]
    await watch.wait(ids, 60)
    pre = sorted(watch.built[i] - sent for i in ids)
    post = sorted(watch.seen[i] - watch.built[i] for i in ids)
    if n > 1:
        log(
            f"llm: produce->outcome p50 {pre[len(pre) // 2] * 1000:.0f} ms, "
            f"outcome->seen p50 {post[len(post) // 2] * 1000:.0f} ms"
        )
    return [watch.seen[i] - sent for i in ids]


async def run(ctx: BenchContext) -> dict[str, float]:
    port = free_port()
    server = subprocess.Popen(  # noqa: ASYNC220 - started once, before measuring
        [
            sys.executable,
            "-m",
            "tests.llm_server",
            "--port",
            str(port),
            "--words",
            str(len(WORDS)),
            "--delay",
            str(CHUNK_DELAY_S),
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    assert server.stdout is not None
    line = await asyncio.to_thread(server.stdout.readline)
    if b"listening" not in line:
        raise BenchError(f"loopback LLM server did not start: {line!r}")
    base = f"http://127.0.0.1:{port}"
    providers = Path(ctx.work_dir) / f"llm-providers-{uuid.uuid4().hex[:6]}.yaml"
    providers.parent.mkdir(parents=True, exist_ok=True)
    providers.write_text(
        f"providers:\n  loop: {{kind: vllm, base_url: '{base}/v1', max_concurrency: 256}}\n"
    )
    try:
        pool = ClientPool(timeout=httpx.Timeout(30))
        url = base + "/v1/chat/completions"
        env = ctx.new_env(
            AGENTSTREAM_AGENTS="agents.llm",
            AGENTSTREAM_LLM_PROVIDERS_FILE=str(providers),
            AGENTSTREAM_LLM_MAX_CONCURRENCY="256",
        )
        await ctx.ensure_topics(env)
        topic = ctx.topic(env, LLM_REQUESTS)
        watch = ResponseWatch(ctx.bootstrap, ctx.topic(env, LLM_RESPONSES))
        await watch.start()
        if os.environ.get("BENCH_LLM_PROFILE"):
            worker = ctx.start_process(
                env,
                "-m",
                "cProfile",
                "-o",
                os.environ["BENCH_LLM_PROFILE"],
                "-m",
                "streams",
                "worker",
                "--loglevel",
                "info",
            )
        else:
            worker = ctx.start_worker(env)
        try:
            await worker.wait_ready()
            producer = AIOKafkaProducer(bootstrap_servers=ctx.bootstrap, acks=1, linger_ms=1)
            await producer.start()
            try:
                # warm-up of both sides: connections, group join
                await direct_round(pool, url)
                await pipeline_round(producer, topic, watch)
                # direct and pipeline rounds alternate, so both see the same machine load
                # (the VM is shared: measuring one side first and the other later
                # compared two different loads)
                direct: list[float] = []
                piped: list[float] = []
                direct_cpu = worker_cpu = elapsed = 0.0
                proc = psutil.Process(worker.proc.pid) if worker.proc else None
                for _ in range(ROUNDS):
                    cpu0 = time.process_time()
                    direct += await direct_round(pool, url)
                    direct_cpu += time.process_time() - cpu0
                    wcpu0 = sum(proc.cpu_times()[:2]) if proc else 0.0
                    t0 = time.monotonic()
                    piped += await pipeline_round(producer, topic, watch)
                    elapsed += time.monotonic() - t0
                    worker_cpu += (sum(proc.cpu_times()[:2]) - wcpu0) if proc else 0.0
                direct_cpu_ms = direct_cpu * 1000 / (ROUNDS * IN_FLIGHT)
                worker_cpu_ms = worker_cpu * 1000 / (ROUNDS * IN_FLIGHT)
                # one request at a time: the pipeline's fixed cost (Kafka hops, linger,
                # fetches) without the CPU contention of a burst
                single_direct: list[float] = []
                single_piped: list[float] = []
                for _ in range(SINGLES):
                    single_direct += await direct_round(pool, url, 1)
                    single_piped += await pipeline_round(producer, topic, watch, 1)
            finally:
                await producer.stop()
                await pool.aclose()
        finally:
            await watch.stop()
            worker.stop()
    finally:
        server.terminate()
        server.wait(10)
    d50, d99 = pct(direct, 0.5) * 1000, pct(direct, 0.99) * 1000
    log(f"llm: direct p50 {d50:.1f} ms p99 {d99:.1f} ms")
    log(
        f"llm: CPU per request: direct httpx client {direct_cpu_ms:.2f} ms, "
        f"pipeline worker {worker_cpu_ms:.2f} ms"
    )
    calls = watch.call_ms[IN_FLIGHT : IN_FLIGHT * (ROUNDS + 1)]  # the measured rounds
    log(f"llm: in-worker call latency p50 {pct(calls, 0.5):.1f} ms p99 {pct(calls, 0.99):.1f} ms")
    log(f"llm: pipeline p50 {pct(piped, 0.5) * 1000:.1f} ms p99 {pct(piped, 0.99) * 1000:.1f} ms")
    return {
        "llm_rps": round(len(piped) / elapsed, 1),
        "llm_added_p50_ms": round((pct(piped, 0.5) - pct(direct, 0.5)) * 1000, 2),
        "llm_added_p99_ms": round((pct(piped, 0.99) - pct(direct, 0.99)) * 1000, 2),
        "llm_direct_p50_ms": round(statistics.median(direct) * 1000, 2),
        "llm_single_added_p50_ms": round(
            (statistics.median(single_piped) - statistics.median(single_direct)) * 1000, 2
        ),
        "llm_worker_cpu_ms_per_request": round(worker_cpu_ms, 3),
        "llm_direct_cpu_ms_per_request": round(direct_cpu_ms, 3),
    }
