"""The call_llm stage against the loopback LLM server, 200 requests in flight.

Two measurements, each pipeline-vs-direct side by side in one run:

**Steady load (the latency keys).** 200 clients each send a streaming chat completion,
wait for its end and send the next (a closed loop, like ``wrk -c 200``), for a few
seconds. The loopback server streams like a hosted model: the first token after
``PACED_FIRST_S``, then one every ``PACED_DELAY_S``. *Direct*: the clients
call the server with httpx. *Pipeline*: the clients produce `LLMRequest`s to
`llm.requests` and wait for each final `LLMResponse` on `llm.responses`; a worker running
only `agents.llm` calls the same server and streams every delta to `llm.chunks` on the
way. ``llm_added_p50_ms`` / ``llm_added_p99_ms`` = that percentile of the pipeline's
latency (request produced → response consumed) minus the same percentile of the direct
latency; ``llm_rps`` = the pipeline's completed requests per second at that load.
Clients start staggered over one stream's length (a ramp, so they do not move as one
convoy) and only requests started after a warm-up are counted.

**Saturation (``llm_saturated_*``).** 200 requests fired at once, all at the same time, to
a server that answers in ~40 ms (8 tokens, 5 ms apart), several rounds. Here both sides
are CPU-bound (one core for the direct client; the worker, the broker, the server and
this harness share two), so the latency of a burst is its CPU time and the difference
measures CPU per request, not waiting: ``llm_saturated_rps`` is the stage's capacity.

**Half load (``llm_half_load_*``).** Requests to the fast server started at half of
``llm_saturated_rps``, evenly spaced (an open loop), direct and pipeline windows
alternating: ``llm_half_load_added_p99_ms`` is the pipeline's p99 minus the direct p99
there — the stage's added latency when it is busy but not saturated.

Direct and pipeline windows alternate, so both see the same load on a shared machine.
The direct client reads each stream to its end as raw bytes (the cheapest way with
httpx), leasing connections from the same `ClientPool` as the provider.
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
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import orjson
import psutil
from aiokafka import AIOKafkaProducer, TopicPartition

from agentstream.agents.llm.providers._http import ClientPool, free_cycle
from agentstream.schemas import Event, encode
from agentstream.schemas.llm import ChatMessage, LLMConfig, LLMContext, LLMRequest
from agentstream.streams.kafka_security import new_consumer, new_producer
from agentstream.streams.settings import Settings
from agentstream.streams.topics import LLM_REQUESTS, LLM_RESPONSES
from bench.context import REPO, BenchContext, BenchError, free_port, log

NAME = "llm"
IN_FLIGHT = 200

#: steady load: a hosted model's pace (time to first token, then 20 tokens/s); 200
#: streams of this pace are ~330 requests/s and ~3000 deltas/s, which already keeps one
#: Python httpx client about half busy on this machine (docs/bench.md)
PACED_WORDS = int(os.environ.get("BENCH_LLM_WORDS", 8))
PACED_FIRST_S = float(os.environ.get("BENCH_LLM_FIRST_S", 0.2))
PACED_DELAY_S = float(os.environ.get("BENCH_LLM_DELAY_S", 0.05))
#: seconds each side runs per window (after WARMUP_S), and windows per side
WINDOW_S = 4.0
WARMUP_S = 1.0
WINDOWS = 2

#: worker processes in the consumer group (`BENCH_LLM_WORKERS`)
WORKERS = int(os.environ.get("BENCH_LLM_WORKERS", 1))

#: saturation: a fast server, 200 requests at once
BURST_WORDS = 8
BURST_DELAY_S = 0.005
ROUNDS = 4
#: sequential single requests (each side) measuring the pipeline's fixed added latency
SINGLES = 20


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


BODY = {
    "model": "bench",
    "stream": True,
    "stream_options": {"include_usage": True},
    "messages": [{"role": "user", "content": "hello"}],
}


def direct_call(pool: ClientPool, url: str) -> Callable[[], Awaitable[float]]:
    """One streaming completion straight with httpx (leasing connections like the
    provider does, so the baseline does not suffer httpcore's burst serialisation)."""

    async def one() -> float:
        t0 = time.perf_counter()
        async with pool.lease() as client, client.stream("POST", url, json=BODY) as resp:
            # to the end, like the provider, so the connection is reused; raw bytes, the
            # cheapest way to read it (the provider parses every event: the baseline
            # never does more work than the pipeline)
            async for _data in resp.aiter_bytes():
                pass
        free_cycle(resp)  # like the provider: a call is freed by reference counting
        return time.perf_counter() - t0

    return one


class ResponseWatch:
    """Resolves a future per request id when its final response is consumed."""

    def __init__(self, settings: Settings, topic: str) -> None:
        self.settings, self.topic = settings, topic
        self.waiting: dict[str, asyncio.Future[float]] = {}
        #: each response's own latency_ms (admission to final outcome, inside the worker)
        self.call_ms: list[float] = []
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self.consumer = new_consumer(
            self.settings, "bench", enable_auto_commit=False, fetch_max_wait_ms=5
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

    def expect(self, request_id: str) -> asyncio.Future[float]:
        fut = self.waiting[request_id] = asyncio.get_running_loop().create_future()
        return fut

    async def _run(self) -> None:
        try:
            while True:
                batch = await self.consumer.getmany(timeout_ms=50)
                now = time.perf_counter()  # the same clock as the direct side
                for records in batch.values():
                    for rec in records:
                        payload = orjson.loads(rec.value)["payload"]
                        self.call_ms.append(float(payload["latency_ms"]))
                        fut = self.waiting.pop(payload["request_id"], None)
                        if fut is None or fut.done():
                            continue
                        if payload["status"] != "completed":
                            fut.set_exception(
                                BenchError(f"request {payload['request_id']}: {payload['status']}")
                            )
                        else:
                            fut.set_result(now)
        except Exception as exc:  # fail every waiter rather than let them time out
            for fut in self.waiting.values():
                if not fut.done():
                    fut.set_exception(exc)
            raise

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        await self.consumer.stop()


def request_event(provider: str, n: int) -> Event[Any]:
    return Event.of(
        LLMRequest(
            request_id=f"{uuid.uuid4().hex[:12]}-{n}",
            agent_id=f"bench-{n % 16}",
            provider=provider,
            context=LLMContext(messages=[ChatMessage(role="user", content="hello")]),
            config=LLMConfig(model="bench"),
        ),
        source="bench",
    )


def pipeline_call(
    producer: AIOKafkaProducer, topic: str, watch: ResponseWatch, provider: str
) -> Callable[[], Awaitable[float]]:
    """One request through the pipeline, timed from the produce call to the response
    being consumed (the producer is started once: starting one per call would count its
    metadata round trips as pipeline latency)."""
    counter = iter(range(1 << 62))

    async def one() -> float:
        event = request_event(provider, next(counter))
        key, value = event.key.encode(), encode(event)
        seen = watch.expect(event.payload.request_id)
        sent = time.perf_counter()
        await producer.send(topic, value, key=key)
        return await asyncio.wait_for(seen, 60) - sent

    return one


async def closed_loop(
    call: Callable[[], Awaitable[float]],
    clients: int,
    stagger_s: float,
    warmup_s: float,
    window_s: float = WINDOW_S,
) -> tuple[list[float], float]:
    """`clients` loops calling back to back for `warmup_s` + `window_s`, client i starting
    `stagger_s * i / clients` late; the latencies of the calls started after the warm-up
    and within the window (each waited for to its end), and how many of them there were
    per second of the window."""
    t0 = time.monotonic()
    measure_from, end = t0 + warmup_s, t0 + warmup_s + window_s
    latencies: list[float] = []

    async def client(i: int) -> None:
        await asyncio.sleep(stagger_s * i / clients)
        while (started := time.monotonic()) < end:
            latency = await call()
            if started >= measure_from:
                latencies.append(latency)

    await asyncio.gather(*(client(i) for i in range(clients)))
    return latencies, len(latencies) / window_s


async def open_loop(
    call: Callable[[], Awaitable[float]], rate: float, warmup_s: float, window_s: float
) -> list[float]:
    """Calls started at a fixed `rate` per second whatever the answers' pace (an open
    loop, as independent clients arrive), for `warmup_s` + `window_s`; the latencies of
    those started after the warm-up, each waited for to its end."""
    t0 = time.monotonic()
    measure_from = t0 + warmup_s
    calls = int(rate * (warmup_s + window_s))
    latencies: list[float] = []

    async def one(started: float) -> None:
        latency = await call()
        if started >= measure_from:
            latencies.append(latency)

    tasks = []
    for i in range(calls):
        delay = t0 + i / rate - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(time.monotonic())))
    await asyncio.gather(*tasks)
    return latencies


async def burst(call: Callable[[], Awaitable[float]], n: int = IN_FLIGHT) -> list[float]:
    return list(await asyncio.gather(*(call() for _ in range(n))))


def start_server(words: int, delay_s: float, first_delay_s: float = 0.0) -> tuple[Any, str]:
    port = free_port()
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tests.llm_server",
            "--port",
            str(port),
            "--words",
            str(words),
            "--delay",
            str(delay_s),
            "--first-delay",
            str(first_delay_s),
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    return server, f"http://127.0.0.1:{port}"


class Cpu:
    """CPU seconds of some processes (user + system) between two readings."""

    def __init__(self, *pids: int | None) -> None:
        self.procs = [psutil.Process(p) for p in pids if p]

    def read(self) -> float:
        return sum(sum(p.cpu_times()[:2]) for p in self.procs)


async def run(ctx: BenchContext) -> dict[str, float]:
    paced_srv, paced_base = start_server(PACED_WORDS, PACED_DELAY_S, PACED_FIRST_S)
    fast_srv, fast_base = start_server(BURST_WORDS, BURST_DELAY_S)
    servers = [paced_srv, fast_srv]
    try:
        for srv in servers:
            assert srv.stdout is not None
            line = await asyncio.to_thread(srv.stdout.readline)
            if b"listening" not in line:
                raise BenchError(f"loopback LLM server did not start: {line!r}")
        providers = Path(ctx.work_dir) / f"llm-providers-{uuid.uuid4().hex[:6]}.yaml"
        providers.parent.mkdir(parents=True, exist_ok=True)
        providers.write_text(
            "providers:\n"
            f"  paced: {{kind: vllm, base_url: '{paced_base}/v1', max_concurrency: 256}}\n"
            f"  fast: {{kind: vllm, base_url: '{fast_base}/v1', max_concurrency: 256}}\n"
        )
        return await _measure(ctx, providers, paced_base, fast_base)
    finally:
        for srv in servers:
            srv.terminate()
        for srv in servers:
            srv.wait(10)


async def _measure(
    ctx: BenchContext, providers: Path, paced_base: str, fast_base: str
) -> dict[str, float]:
    pool = ClientPool(timeout=httpx.Timeout(30))
    env = ctx.new_env(
        AGENTSTREAM_AGENTS="llm",
        AGENTSTREAM_LLM_PROVIDERS_FILE=str(providers),
        AGENTSTREAM_LLM_MAX_CONCURRENCY="256",
        # a latency-bound stage: every broker hop would otherwise wait for a batch
        AGENTSTREAM_PRODUCER_LINGER_MS=os.environ.get("BENCH_LLM_LINGER_MS", "0"),
        AGENTSTREAM_LLM_CHUNK_COALESCE_MS=os.environ.get("BENCH_LLM_COALESCE_MS", "5"),
        # as recommended for LLM workers (docs/llm.md); the harness runs on the same loop
        AGENTSTREAM_EVENT_LOOP=os.environ.get("BENCH_EVENT_LOOP", "uvloop"),
    )
    await ctx.ensure_topics(env)
    topic = ctx.topic(env, LLM_REQUESTS)
    watch = ResponseWatch(ctx.settings, ctx.topic(env, LLM_RESPONSES))
    await watch.start()
    if os.environ.get("BENCH_LLM_PROFILE"):  # e.g. `-m pyinstrument -o FILE` around it
        worker = ctx.start_process(
            env,
            *os.environ["BENCH_LLM_PROFILE"].split(),
            "-m",
            "agentstream",
            "worker",
            "-l",
            "info",
        )
    else:
        worker = ctx.start_worker(env)
    # more workers in the same group (own web port and data dir) share the partitions
    others = [
        ctx.start_worker(
            env
            | {
                "AGENTSTREAM_WEB_PORT": str(free_port()),
                "AGENTSTREAM_DATA_DIR": f"{env['AGENTSTREAM_DATA_DIR']}-{n}",
            }
        )
        for n in range(1, WORKERS)
    ]
    out: dict[str, float] = {"llm_workers": WORKERS}
    try:
        for w in [worker, *others]:
            await w.wait_ready()
        producer = new_producer(ctx.settings, "bench", acks=1, linger_ms=1)
        await producer.start()
        try:
            direct_paced = direct_call(pool, paced_base + "/v1/chat/completions")
            piped_paced = pipeline_call(producer, topic, watch, "paced")
            direct_fast = direct_call(pool, fast_base + "/v1/chat/completions")
            piped_fast = pipeline_call(producer, topic, watch, "fast")
            cpu = Cpu(*(w.proc.pid if w.proc else None for w in [worker, *others]))

            # warm-up of both sides: connections, group join (and the rebalances of
            # further workers joining), code paths
            await burst(direct_fast)
            for _ in range(WORKERS):
                await burst(piped_fast)

            stream_s = PACED_FIRST_S + PACED_WORDS * PACED_DELAY_S
            direct: list[float] = []
            piped: list[float] = []
            direct_rps: list[float] = []
            piped_rps: list[float] = []
            worker_cpu = 0.0
            direct_cpu = 0.0
            for _ in range(WINDOWS):
                c0 = time.process_time()
                lat, rps = await closed_loop(direct_paced, IN_FLIGHT, stream_s, WARMUP_S)
                direct_cpu += time.process_time() - c0
                direct += lat
                direct_rps.append(rps)
                c0 = cpu.read()
                lat, rps = await closed_loop(piped_paced, IN_FLIGHT, stream_s, WARMUP_S)
                worker_cpu += cpu.read() - c0
                piped += lat
                piped_rps.append(rps)
            log(
                f"llm steady: direct {statistics.mean(direct_rps):.0f} req/s "
                f"p50 {pct(direct, 0.5) * 1000:.1f} p99 {pct(direct, 0.99) * 1000:.1f} ms; "
                f"pipeline {statistics.mean(piped_rps):.0f} req/s "
                f"p50 {pct(piped, 0.5) * 1000:.1f} p99 {pct(piped, 0.99) * 1000:.1f} ms; "
                f"CPU: worker {worker_cpu / (WINDOWS * (WINDOW_S + WARMUP_S)) * 100:.0f}%, "
                f"direct client {direct_cpu / (WINDOWS * (WINDOW_S + WARMUP_S)) * 100:.0f}%"
            )
            out.update(
                llm_rps=round(statistics.mean(piped_rps), 1),
                llm_added_p50_ms=round((pct(piped, 0.5) - pct(direct, 0.5)) * 1000, 2),
                llm_added_p99_ms=round((pct(piped, 0.99) - pct(direct, 0.99)) * 1000, 2),
                llm_direct_p99_ms=round(pct(direct, 0.99) * 1000, 2),
                llm_requests_measured=len(piped),
            )

            # saturation: 200 at once against the fast server
            sat_direct: list[float] = []
            sat_piped: list[float] = []
            direct_cpu = worker_cpu = elapsed = 0.0
            for _ in range(ROUNDS):
                c0 = time.process_time()
                sat_direct += await burst(direct_fast)
                direct_cpu += time.process_time() - c0
                c0, t0 = cpu.read(), time.monotonic()
                sat_piped += await burst(piped_fast)
                elapsed += time.monotonic() - t0
                worker_cpu += cpu.read() - c0
            direct_cpu_ms = direct_cpu * 1000 / (ROUNDS * IN_FLIGHT)
            worker_cpu_ms = worker_cpu * 1000 / (ROUNDS * IN_FLIGHT)
            log(
                f"llm saturated: direct p50 {pct(sat_direct, 0.5) * 1000:.1f} "
                f"p99 {pct(sat_direct, 0.99) * 1000:.1f} ms, pipeline "
                f"p50 {pct(sat_piped, 0.5) * 1000:.1f} p99 {pct(sat_piped, 0.99) * 1000:.1f} "
                f"ms; CPU per request: direct httpx client {direct_cpu_ms:.2f} ms, "
                f"pipeline worker {worker_cpu_ms:.2f} ms"
            )
            out.update(
                llm_saturated_rps=round(len(sat_piped) / elapsed, 1),
                llm_saturated_added_p50_ms=round(
                    (pct(sat_piped, 0.5) - pct(sat_direct, 0.5)) * 1000, 2
                ),
                llm_saturated_added_p99_ms=round(
                    (pct(sat_piped, 0.99) - pct(sat_direct, 0.99)) * 1000, 2
                ),
                llm_worker_cpu_ms_per_request=round(worker_cpu_ms, 3),
                llm_direct_cpu_ms_per_request=round(direct_cpu_ms, 3),
            )

            # half the saturated rate, steadily: the added latency when the stage is
            # busy but not saturated (the saturated p99 is mostly queueing for the CPU)
            half = out["llm_saturated_rps"] / 2
            half_direct: list[float] = []
            half_piped: list[float] = []
            for _ in range(WINDOWS):
                half_direct += await open_loop(direct_fast, half, WARMUP_S, WINDOW_S)
                half_piped += await open_loop(piped_fast, half, WARMUP_S, WINDOW_S)
            out["llm_half_load_rps"] = round(half, 1)
            out["llm_half_load_added_p99_ms"] = round(
                (pct(half_piped, 0.99) - pct(half_direct, 0.99)) * 1000, 2
            )
            log(
                f"llm at half load ({half:.0f} req/s): direct p99 "
                f"{pct(half_direct, 0.99) * 1000:.1f} ms, pipeline p99 "
                f"{pct(half_piped, 0.99) * 1000:.1f} ms"
            )

            # one request at a time: the pipeline's fixed cost (Kafka hops, fetches)
            single_direct: list[float] = []
            single_piped: list[float] = []
            calls_before = len(watch.call_ms)
            for _ in range(SINGLES):
                single_direct += await burst(direct_fast, 1)
                single_piped += await burst(piped_fast, 1)
            single_calls = watch.call_ms[calls_before:]
            out["llm_single_added_p50_ms"] = round(
                (statistics.median(single_piped) - statistics.median(single_direct)) * 1000, 2
            )
            # the worker's own time per call (admission to final outcome): the rest of
            # the added latency is the Kafka hops (request in, response out)
            if single_calls:
                out["llm_single_worker_call_p50_ms"] = round(statistics.median(single_calls), 2)
            log(
                f"llm one at a time: direct p50 {statistics.median(single_direct) * 1000:.1f} "
                f"ms, pipeline p50 {statistics.median(single_piped) * 1000:.1f} ms, of which "
                f"the worker's call {statistics.median(single_calls or [0]):.1f} ms"
            )
        finally:
            await producer.stop()
            await pool.aclose()
    finally:
        await watch.stop()
        for w in [worker, *others]:
            w.stop()
    return out
