"""The fault scenarios and their registry.

A scenario is an async function of a `RunContext` that injects its faults while the load
runs (fault moments follow the load's progress, so they land mid-stream whatever the
machine's speed) and returns when its faults are over; the harness then drains the
pipeline and checks it. Its docstring says what a passing run proves. Scenarios whose
infrastructure or fault hook does not exist yet are registered as hooks (`needs` says
what is missing) and reported as skipped."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
import zlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import orjson

from tests.chaos.cluster import OwnBroker, OwnKafka
from tests.chaos.collect import INPUT_TOPIC
from tests.chaos.harness import RunContext, RunHooks, ScenarioFunc
from tests.chaos.llm import CALL_S, PROVIDER, RATE_LIMITED, SLOTS, LlmSaturation
from tests.chaos.raises import RaisePlan
from tests.support import await_until


@dataclass(frozen=True)
class Scenario:
    name: str
    func: ScenarioFunc | None
    doc: str
    workers: int = 1
    partitions: int = 4
    runs: int = 3
    #: input rate (messages/s); the load lasts messages / rate
    rate: float = 500.0
    poison_ratio: float = 0.0
    standby_replicas: int = 0
    #: the run needs a broker of its own, which it may kill
    own_broker: bool = False
    #: with own_broker, which Kafka: "broker" (one node, `OwnBroker`), "proxied" (one
    #: node behind Toxiproxy, `OwnKafka`) or "cluster" (3 nodes, RF 3, `OwnKafka`)
    kafka: str = "broker"
    #: what is missing before the scenario can run (None: implemented)
    needs: str | None = None

    @property
    def implemented(self) -> bool:
        return self.func is not None and self.needs is None


SCENARIOS: dict[str, Scenario] = {}


def scenario(
    name: str, hooks: Callable[[], RunHooks] | None = None, **kw: Any
) -> Callable[[ScenarioFunc], ScenarioFunc]:
    """Register `func` as scenario `name`; `hooks` makes the per-run `RunHooks` the
    scenario needs besides its faults (set-up before the workers start, a drain
    condition, a check of its own; the harness finds it as `func.hooks`)."""

    def register(func: ScenarioFunc) -> ScenarioFunc:
        if hooks is not None:
            setattr(func, "hooks", hooks)  # noqa: B010 - an attribute of a function
        SCENARIOS[name] = Scenario(name, func, (func.__doc__ or "").strip(), **kw)
        return func

    return register


def hook(name: str, needs: str, doc: str, **kw: Any) -> None:
    """A scenario to fill in once `needs` exists."""
    SCENARIOS[name] = Scenario(name, None, doc, needs=needs, **kw)


# --------------------------------------------------------------------------- worker_kill

#: each worker is kill -9'ed at least this many times per run (CI lowers it)
KILLS_PER_WORKER = 5


def kill_plan(rng: Any, workers: int, kills_per_worker: int) -> list[tuple[int, str]]:
    """(worker index, mode) steps: every worker gets at least `kills_per_worker` kills;
    one step per worker (in turn) is a kill *during recovery* (killed again before it is
    Ready) or *twice in a row* (killed again as soon as it is Ready), both count two."""
    steps: list[tuple[int, str]] = []
    for w in range(workers):
        special = "during_recovery" if w % 2 == 0 else "twice"
        mine = [(w, special)]
        kills = 2
        while kills < kills_per_worker:
            mine.append((w, "single"))
            kills += 1
        steps += mine
    rng.shuffle(steps)
    return steps


@scenario("worker_kill", workers=3, partitions=6, runs=10, rate=400.0, standby_replicas=1)
async def worker_kill(ctx: RunContext) -> None:
    """Three workers of one group, each kill -9'ed and restarted at least 5 times at random
    moments of the load — including once killed again while it recovers (before Ready)
    or twice in a row. Proves: no input lost across repeated crashes and rebalances;
    exactly-once leaves no duplicate for read_committed readers (at-least-once: duplicates
    within one commit interval per kill); decisions stay in source order per partition;
    the decision counts equal their rebuild and the signed chains verify. Measures
    resume_after_kill_s: kill -> first output on a partition the killed worker held."""
    per_worker = int(ctx.opts.extra_env.get("CHAOS_KILLS_PER_WORKER", KILLS_PER_WORKER))
    steps = kill_plan(ctx.rng, len(ctx.workers), per_worker)
    span = 0.9
    for i, (index, mode) in enumerate(steps):
        lo, hi = span * i / len(steps), span * (i + 1) / len(steps)
        await ctx.load.reached(ctx.rng.uniform(lo, hi))
        w = ctx.workers[index]
        await ctx.kill_worker(w)
        if mode == "during_recovery":
            w.launch()
            ctx.log("restart", target=w.name)
            await asyncio.sleep(ctx.rng.uniform(0.5, 3.0))  # starting, not yet Ready
            if w.ready_count() > w._ready_seen:
                ctx.note("a kill meant for recovery came after Ready (slow host?)")
            await ctx.kill_worker(w)
        await ctx.restart_worker(w)
        if mode == "twice":
            await ctx.kill_worker(w)
            await ctx.restart_worker(w)


# --------------------------------------------------------------------------- worker_stop


@scenario("worker_stop", workers=2, partitions=4, runs=3, rate=500.0, standby_replicas=1)
async def worker_stop(ctx: RunContext) -> None:
    """One of two workers SIGSTOP'ed mid-load for longer than its session timeout (the
    group moves its partitions to the other), then SIGCONT'ed: a zombie that wakes up
    with a batch in hand. Proves: the zombie is fenced — under exactly-once it writes no
    committed duplicate (its transactions are aborted by the new owner's), and nothing
    is lost either way; at-least-once counts the zombie's duplicates."""
    await ctx.load.reached(ctx.rng.uniform(0.2, 0.4))
    w = ctx.workers[0]
    partitions = ctx.watch.partitions(w.port)
    crashes = len(w.crashes)
    w.suspend()
    mark = ctx.fault("SIGSTOP", w.name, partitions)  # after: what it wrote before is no resume
    stopped_s = ctx.session_timeout_s + 5.0
    try:
        await asyncio.sleep(stopped_s)
    finally:
        w.resume()
        ctx.log("SIGCONT", target=w.name)
    # the evidence: its partitions moved to the other worker while it stood still (one
    # with output again will do: the run's resume time is the measure), and on waking it
    # knew it had frozen past its session (WorkerFroze: it restarts)
    moved = [
        d.seen_at
        for d in ctx.collector.decisions()
        if (d.source_partition if d.source_partition is not None else d.partition) in partitions
        and d.made_at > mark.at
        and d.seen_at < mark.at + stopped_s
    ]
    if partitions and not moved:
        ctx.fail("worker_stop: none of its partitions had output while it was stopped")
    with contextlib.suppress(AssertionError):
        await await_until(lambda: len(w.crashes) > crashes, 60, 0.5)
    if len(w.crashes) == crashes:
        ctx.fail("worker_stop: the worker woke and did not restart (no freeze noticed)")


# --------------------------------------------------------------------------- broker_restart


@scenario("broker_restart", workers=2, partitions=4, runs=3, rate=500.0, own_broker=True)
async def broker_restart(ctx: RunContext) -> None:
    """The (single) broker kill -9'ed mid-load and restarted on the same data dir (log
    recovery after an unclean stop). Proves: producer, workers and consumer group come
    back by themselves (a worker that dies is restarted as by a supervisor), no
    acknowledged input is lost, exactly-once writes no committed duplicate, and chains
    and tables stay consistent. resume_after_kill_s here is kill -> first output after."""
    broker = ctx.broker
    if not isinstance(broker, OwnBroker):
        raise RuntimeError("broker_restart needs a broker of its own (OwnBroker)")
    await ctx.load.reached(ctx.rng.uniform(0.3, 0.5))
    everything = frozenset(range(ctx.opts.partitions))
    await asyncio.to_thread(broker.kill)  # returns once the process is gone
    ctx.fault("broker kill -9", "broker", everything)
    await asyncio.sleep(ctx.rng.uniform(1.0, 3.0))
    await asyncio.to_thread(broker.restart)
    ctx.log("broker ready")


# --------------------------------------------------------------------------- poison


@scenario("poison", workers=1, partitions=4, runs=3, rate=1000.0, poison_ratio=0.01)
async def poison(ctx: RunContext) -> None:
    """1% poison in the load: undecodable bytes, an event of the wrong type, a
    schema-invalid agent.message, in turn. Proves: every poison record becomes a dead
    letter carrying its original (partition, offset), no valid input is dead-lettered
    or lost, the worker never stops, and (exactly-once) no dead letter is duplicated."""
    await ctx.load.reached(1.0)


# --------------------------------------------------------------------------- output_refused


async def _set_max_message_bytes(bootstrap: str, topic: str, value: int) -> None:
    from aiokafka.admin import AIOKafkaAdminClient
    from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        resource = ConfigResource(
            ConfigResourceType.TOPIC, topic, {"max.message.bytes": str(value)}
        )
        responses = await admin.alter_configs([resource])
    finally:
        await admin.close()
    # aiokafka returns the broker's error codes without raising
    for response in responses if isinstance(responses, list) else [responses]:
        for error_code, message, *_ in response.resources:
            if error_code:
                raise RuntimeError(f"max.message.bytes of {topic} not set: {error_code} {message}")


@scenario("output_refused", workers=1, partitions=4, runs=3, rate=500.0)
async def output_refused(ctx: RunContext) -> None:
    """The broker refuses the worker's outputs for a while: `agent.messages.accepted`'s
    max.message.bytes is lowered below a producer batch for 10 s, then restored (as in
    tests/integration/test_delivery_failure.py). The worker must not acknowledge inputs
    whose output was refused: it crashes, the supervisor restarts it (again and again
    while the refusal lasts). Proves: nothing is lost once the broker accepts again, and
    exactly-once leaves no duplicate."""
    topic = f"{ctx.ns}.agent.messages.accepted"
    await ctx.load.reached(ctx.rng.uniform(0.2, 0.4))
    crashes = sum(len(w.crashes) for w in ctx.workers)
    await _set_max_message_bytes(ctx.opts.bootstrap, topic, 300)
    ctx.fault("output refused", topic, frozenset(range(ctx.opts.partitions)))
    await asyncio.sleep(10.0)
    await _set_max_message_bytes(ctx.opts.bootstrap, topic, 1_048_588)
    ctx.log("output accepted again")
    # the evidence: a worker whose output was refused crashed (it acks nothing it could
    # not write); its supervisor notes the exit within a second
    with contextlib.suppress(AssertionError):
        await await_until(lambda: sum(len(w.crashes) for w in ctx.workers) > crashes, 30, 0.5)
    if sum(len(w.crashes) for w in ctx.workers) == crashes:
        ctx.fail("output_refused: no worker crashed while its outputs were refused")


# --------------------------------------------------------------------------- network faults
# One broker behind Toxiproxy, started by the run (`OwnKafka(proxied=True)`): the broker
# advertises the proxy's port, so every connection of the workers, the load's producer,
# the collector, the group watcher and the CLI checks crosses the proxy.


def _load_s(ctx: RunContext) -> float:
    """How long the load lasts at the scenario's rate."""
    return ctx.opts.messages / ctx.opts.rate if ctx.opts.rate > 0 else 60.0


def fault_span(ctx: RunContext, full_s: float, low_s: float = 10.0) -> float:
    """A fault's length scaled to the run: `full_s` on a long run, half the load's
    duration on a short one (a 2,000-5,000 message run), never under `low_s`.
    CHAOS_FAULT_S in the run's extra env overrides it."""
    forced = ctx.opts.extra_env.get("CHAOS_FAULT_S")
    if forced:
        return float(forced)
    return max(low_s, min(full_s, 0.5 * _load_s(ctx)))


def _own_kafka(ctx: RunContext, what: str, nodes: int = 1) -> OwnKafka:
    kafka = ctx.broker
    if not isinstance(kafka, OwnKafka) or kafka.cfg.nodes < nodes:
        raise RuntimeError(f"{what} needs a Kafka of its own ({nodes} node(s), OwnKafka)")
    return kafka


def _everything(ctx: RunContext) -> frozenset[int]:
    return frozenset(range(ctx.opts.partitions))


class _Rate:
    """Decisions per second between two marks (the throughput dip of a fault)."""

    def __init__(self, ctx: RunContext) -> None:
        self.ctx = ctx
        self.mark()

    def mark(self) -> None:
        self.n, self.t = len(self.ctx.collector.decided_ids), time.time()

    def since(self) -> float:
        n, t = len(self.ctx.collector.decided_ids), time.time()
        return (n - self.n) / max(1e-3, t - self.t)


class _Backlog:
    """The median backlog (inputs without an outcome, as the collector sees them) since
    the last `mark`, sampled every quarter second: a link's added delay shows as a
    backlog of about rate x delay (a median, not a maximum: one spike is no delay)."""

    def __init__(self, ctx: RunContext) -> None:
        self.ctx = ctx
        self.samples: list[int] = []
        self._task = asyncio.create_task(self._sample())

    async def _sample(self) -> None:
        while True:
            self.samples.append(self.ctx.collector.pending())
            await asyncio.sleep(0.25)

    def mark(self) -> int:
        samples, self.samples = sorted(self.samples), []
        return samples[len(samples) // 2] if samples else 0

    def stop(self) -> None:
        self._task.cancel()


#: a latency fault must raise the backlog by this much delay's worth of input (its
#: 200 +- 100 ms per round trip add far more: produce, fetch and commit each wait)
LATENCY_EVIDENCE_S = 0.1
#: a bandwidth cap must bring the decision rate below this share of the rate before
BANDWIDTH_EVIDENCE = 0.8


async def _toxics_for(
    ctx: RunContext, kind: str, toxics: list[tuple[str, dict[str, Any], str]], full_s: float
) -> tuple[float, float, int, int]:
    """`toxics` ((type, attributes, stream)) on every proxy for `fault_span(full_s)`
    from a quarter of the load on, then healed; notes and returns the decision rate and
    the median backlog before and during the fault."""
    kafka = _own_kafka(ctx, kind)
    await ctx.load.reached(0.05)
    rate = _Rate(ctx)
    backlog = _Backlog(ctx)
    try:
        await ctx.load.reached(0.25)
        before, backlog_before = rate.since(), backlog.mark()
        span = fault_span(ctx, full_s)
        ctx.fault(kind, "every client<->broker connection", _everything(ctx))
        rate.mark()
        try:
            for proxy in kafka.proxies():
                for type_, attributes, stream in toxics:
                    await asyncio.to_thread(proxy.add_toxic, type_, attributes, stream=stream)
            await asyncio.sleep(span)
        finally:
            await asyncio.to_thread(kafka.heal)
        during, backlog_during = rate.since(), backlog.mark()
    finally:
        backlog.stop()
    ctx.log(
        "healed",
        after_s=round(span, 1),
        eps_before=round(before),
        eps_during=round(during),
        backlog_before=backlog_before,
        backlog_during=backlog_during,
    )
    ctx.note(
        f"{kind}: {span:.0f}s; decisions/s before {before:.0f}, during {during:.0f} "
        f"(input rate {ctx.opts.rate:.0f}/s); median backlog before {backlog_before}, "
        f"during {backlog_during}"
    )
    return before, during, backlog_before, backlog_during


# The network scenarios' rate: the highest tried at which 20,000-input runs with the full
# fault window (`--fault-s 60`, 30 for the blackhole) passed under both guarantees, the
# workers keeping up outside the window, at 0.5-0.9 of the 2 cores (docs/reliability.md).
# During a 64 KB/s cap the load's own producer is throttled too; the backlog drains after.
@scenario("network_latency", workers=2, runs=3, rate=500.0, own_broker=True, kafka="proxied")
async def network_latency(ctx: RunContext) -> None:
    """200 ms +- 100 ms latency (broker -> client, so every request's round trip) on every
    connection of the workers, the producer and the readers, for 60 s mid-load (half
    the load on a short run), through Toxiproxy in front of a broker of the run's own.
    Proves: slow links lose nothing and exactly-once writes no committed duplicate
    (at-least-once: duplicates only if a commit or session times out). Notes the
    throughput dip (decisions/s before vs during)."""
    _, _, backlog_before, backlog_during = await _toxics_for(
        ctx, "latency", [("latency", {"latency": 200, "jitter": 100}, "downstream")], 60.0
    )
    if backlog_during < backlog_before + LATENCY_EVIDENCE_S * ctx.opts.rate:
        ctx.fail(
            f"latency: the backlog rose only from {backlog_before} to {backlog_during} inputs "
            f"(under {LATENCY_EVIDENCE_S * 1000:.0f} ms of input): no delay reached the clients"
        )


@scenario("network_bandwidth", workers=2, runs=3, rate=500.0, own_broker=True, kafka="proxied")
async def network_bandwidth(ctx: RunContext) -> None:
    """Every client<->broker connection capped at 64 KB/s each way for 60 s mid-load (half
    the load on a short run). Proves: producers and workers back-pressure instead of
    failing — nothing lost, exactly-once no duplicate — and the pipeline catches up
    after. Notes the throughput during the cap."""
    before, during, _, _ = await _toxics_for(
        ctx,
        "bandwidth 64KB/s",
        [("bandwidth", {"rate": 64}, "downstream"), ("bandwidth", {"rate": 64}, "upstream")],
        60.0,
    )
    if during > BANDWIDTH_EVIDENCE * before:
        ctx.fail(
            f"bandwidth: {during:.0f} decisions/s during the cap against {before:.0f} "
            "before: the cap did not reach the clients"
        )


@scenario("network_reset", workers=2, runs=3, rate=500.0, own_broker=True, kafka="proxied")
async def network_reset(ctx: RunContext) -> None:
    """Every client<->broker connection reset (TCP RST, Toxiproxy reset_peer) every 2-5 s
    for 60 s mid-load (half the load on a short run): in-flight produces, fetches,
    commits and transaction requests die with the connection. Proves: clients
    reconnect by themselves, the idempotent/transactional producers write no
    duplicate on their retries (exactly-once: none committed), nothing is lost.
    Each reset is a fault (resume = reset -> next decision)."""
    kafka = _own_kafka(ctx, "network_reset")
    await ctx.load.reached(0.25)
    span = fault_span(ctx, 60.0)
    end = time.monotonic() + span
    resets = 0
    started = time.time()
    try:
        while time.monotonic() < end:
            ctx.fault("reset_peer", "every client<->broker connection", _everything(ctx))
            for proxy in kafka.proxies():
                for stream in ("downstream", "upstream"):
                    await asyncio.to_thread(proxy.reset_peer, 0, stream=stream)
            await asyncio.sleep(0.3)  # connections opened meanwhile are reset too
            await asyncio.to_thread(kafka.heal)
            resets += 1
            await asyncio.sleep(ctx.rng.uniform(2.0, 5.0))
    finally:
        await asyncio.to_thread(kafka.heal)
    # a reset_peer toxic resets a connection only when data crosses it within the
    # 0.3 s: the clients' reconnections are the evidence that resets happened
    await asyncio.sleep(2.0)
    accepted = await asyncio.to_thread(kafka.accepted_clients, started, time.time())
    ctx.note(f"network_reset: {resets} resets in {span:.0f}s, {accepted} reconnections")
    if accepted < resets:
        ctx.fail(
            f"network_reset: {accepted} client connection(s) accepted by the proxy over "
            f"{resets} resets: the resets did not cut the clients' connections"
        )


#: a blackhole lets through at most this many seconds' worth of input (what was
#: already on its way when it began)
BLACKHOLE_EVIDENCE_S = 3.0


@scenario("network_blackhole", workers=2, runs=3, rate=500.0, own_broker=True, kafka="proxied")
async def network_blackhole(ctx: RunContext) -> None:
    """A 30 s blackhole (Toxiproxy timeout toxic, both ways: connections stay open and
    nothing arrives) between every client and the broker mid-load (half the load, at
    least 10 s, on a short run). Longer than the workers' session timeout: the broker
    expels them, their transactions time out or are fenced, the load's sends time out
    and are resent. Proves: once healed the workers rejoin and resume by themselves,
    nothing is lost, exactly-once writes no committed duplicate (a worker that wakes
    up with a batch in hand is fenced). Measures resume = heal -> first decision."""
    kafka = _own_kafka(ctx, "network_blackhole")
    await ctx.load.reached(ctx.rng.uniform(0.25, 0.35))
    span = fault_span(ctx, 30.0)
    ctx.fault("blackhole", "every client<->broker connection", frozenset())
    rate = _Rate(ctx)
    try:
        for proxy in kafka.proxies():
            for stream in ("downstream", "upstream"):
                await asyncio.to_thread(proxy.timeout, 0, stream=stream)
        rate.mark()
        await asyncio.sleep(span)
        seen = rate.since() * span
    finally:
        await asyncio.to_thread(kafka.heal)
    ctx.fault("blackhole healed", f"after {span:.0f}s", _everything(ctx))
    # what crossed the proxy while it held everything: at most what was on its way
    if seen > BLACKHOLE_EVIDENCE_S * ctx.opts.rate:
        ctx.fail(
            f"blackhole: {seen:.0f} decisions arrived during the {span:.0f}s blackhole: "
            "it did not hold the connections"
        )


# --------------------------------------------------------------------------- node kills
# A 3-node KRaft cluster of the run's own (`OwnKafka(nodes=3)`: RF 3 topics,
# min.insync.replicas 2, broker.session.timeout 6 s); a node is kill -9'ed, left down
# past its session timeout (so leadership and coordinators move), then restarted.


async def _down_and_back(
    ctx: RunContext,
    kafka: OwnKafka,
    node: int,
    watch: list[tuple[str, int]],
    fault: tuple[str, str, frozenset[int]],
    moved: Callable[[], Awaitable[int]] | None = None,
) -> None:
    """kill -9 `node` and mark `fault` (kind, target, partitions) once it is down, wait
    until `watch`'s partitions have a new leader (and `moved`, when given, names a node
    other than `node`: a coordinator's), keep it down 8-12 s, restart it and wait until
    their ISR is full again. A node that was not running, a leader or coordinator that
    did not move within 30 s, fail the run: its fault did not happen."""
    from agentstream.infra.kafka import cluster as kc

    t0 = time.monotonic()
    pid = await asyncio.to_thread(kc.kill_node, kafka.cfg, node)
    ctx.fault(*fault)
    if pid is None:
        ctx.fail(f"{fault[0]}: node {node} was not running when it was to be killed")
    kafka.kills += 1
    if moved is not None:
        while True:
            with contextlib.suppress(Exception):
                now = await moved()
                if now != node:
                    ctx.log("coordinator moved", to=now, after_s=round(time.monotonic() - t0, 2))
                    break
            if time.monotonic() - t0 > 30:
                ctx.fail(f"{fault[0]}: the coordinator did not move off node {node} in 30s")
                break
            await asyncio.sleep(0.5)
    bootstrap = ctx.opts.bootstrap
    for topic, p in watch:
        try:
            new = await kc.wait_for_leader(bootstrap, topic, p, not_in={node}, timeout_s=30)
            ctx.log(
                "leader moved",
                partition=f"{topic}-{p}",
                to=new,
                after_s=round(time.monotonic() - t0, 2),
            )
        except kc.LookupTimeout as exc:
            ctx.fail(f"no new leader for {topic}-{p} within 30s of its leader's kill: {exc}")
    await asyncio.sleep(max(0.0, ctx.rng.uniform(8.0, 12.0) - (time.monotonic() - t0)))
    await asyncio.to_thread(kc.restart_node, kafka.cfg, node)
    ctx.log("node rejoined", node=node, down_s=round(time.monotonic() - t0, 1))
    for topic, p in watch:
        try:
            await kc.wait_for_isr(bootstrap, topic, p, size=3, timeout_s=60)
        except kc.LookupTimeout:
            ctx.note(f"{topic}-{p}: ISR not back to 3 within 60s of the restart")
    ctx.log("ISR full", after_s=round(time.monotonic() - t0, 1))


# 300/s: passed 20,000-input runs under both guarantees. The run's CPU (1.1-1.5 cores) is the
# 3-node cluster's and its restarted node's, not the load's: it was the same at 200/s.
@scenario("leader_kill", workers=2, runs=3, rate=300.0, own_broker=True, kafka="cluster")
async def leader_kill(ctx: RunContext) -> None:
    """kill -9 of the node leading agent.messages-0 (and whichever other input
    partitions it leads) on a 3-node cluster (RF 3, min.insync.replicas 2) at 30-50% of
    the load; restarted 8-12 s later (after the controller fenced it and moved
    leadership). Proves: leadership moves, the load's acks=all producer, the workers'
    fetches and produces follow it, no acknowledged input is lost (nothing acked was
    only on the dead node), exactly-once writes no committed duplicate, and the node
    catches up (ISR back to 3). Logs leader failover time; resume = kill -> first
    decision on a partition it led."""
    from agentstream.infra.kafka import cluster as kc

    kafka = _own_kafka(ctx, "leader_kill", nodes=3)
    topic = f"{ctx.ns}.{INPUT_TOPIC}"
    await ctx.load.reached(ctx.rng.uniform(0.3, 0.5))
    leaders = {
        p: await kc.partition_leader(ctx.opts.bootstrap, topic, p)
        for p in range(ctx.opts.partitions)
    }
    node = leaders[0]
    led = frozenset(p for p, n in leaders.items() if n == node)
    await _down_and_back(
        ctx, kafka, node, [(topic, p) for p in sorted(led)], ("leader kill -9", f"node {node}", led)
    )


def _find_key(doc: Any, key: str = "topic_groups") -> Any:
    if isinstance(doc, dict):
        if key in doc:
            return doc[key]
        doc = list(doc.values())
    if isinstance(doc, list):
        for item in doc:
            found = _find_key(item, key)
            if found is not None:
                return found
    return None


async def _topic_group(ctx: RunContext, topic: str) -> int | None:
    """Faust's topic group of `topic` (part of its transactional ids), from the group's
    assignment (each member's ClientAssignment carries `topic_groups`)."""
    from aiokafka.admin import AIOKafkaAdminClient
    from aiokafka.coordinator.protocol import ConsumerProtocolMemberAssignment

    admin = AIOKafkaAdminClient(bootstrap_servers=ctx.opts.bootstrap)
    await admin.start()
    try:
        for resp in await admin.describe_consumer_groups([f"{ctx.ns}-app"]):
            for group in resp.groups:
                for member in group[5]:
                    if not member[4]:
                        continue
                    assign = ConsumerProtocolMemberAssignment.decode(member[4])
                    # Faust's ClientMetadata, zlib-compressed JSON
                    groups = _find_key(orjson.loads(zlib.decompress(assign.user_data)))
                    if groups and topic in groups:
                        return int(groups[topic])
    except Exception as exc:
        ctx.note(f"topic group of {topic} unknown: {exc!r}")
    finally:
        await admin.close()
    return None


@scenario("coordinator_kill", workers=2, runs=3, rate=300.0, own_broker=True, kafka="cluster")
async def coordinator_kill(ctx: RunContext) -> None:
    """kill -9 of a coordinator on a 3-node cluster at 30-50% of the load, restarted 8-12 s
    later: under exactly-once the transaction coordinator of the transactional id of
    agent.messages-0 (`<app id>-<topic group>-0`, Faust's format; marked: every input
    partition whose transactional id it coordinates), under at-least-once the group
    coordinator of the workers' group (marked: every partition). Proves: the
    coordinator moves (the __transaction_state / __consumer_offsets partition's
    leadership), open transactions are completed or aborted by the new coordinator,
    commits resume, nothing is lost, exactly-once writes no committed duplicate
    (at-least-once: duplicates within a commit interval)."""
    from agentstream.infra.kafka import cluster as kc

    kafka = _own_kafka(ctx, "coordinator_kill", nodes=3)
    topic = f"{ctx.ns}.{INPUT_TOPIC}"
    bootstrap = ctx.opts.bootstrap
    await ctx.load.reached(ctx.rng.uniform(0.3, 0.5))
    if ctx.opts.guarantee == "exactly_once":
        tg = await _topic_group(ctx, topic)
        if tg is None:
            # a guess would kill the coordinator of a transactional id nobody uses
            raise RuntimeError(f"coordinator_kill: the topic group of {topic} was not found")
        tids = {p: f"{ctx.ns}-app-{tg}-{p}" for p in range(ctx.opts.partitions)}
        coords = {p: await kc.transaction_coordinator(bootstrap, t) for p, t in tids.items()}
        node = coords[0]
        parts = frozenset(p for p, n in coords.items() if n == node)
        what = f"transaction coordinator of {tids[0]}"

        def moved() -> Awaitable[int]:
            return kc.transaction_coordinator(bootstrap, tids[0], timeout_s=5)
    else:
        node = await kc.group_coordinator(bootstrap, f"{ctx.ns}-app")
        parts = _everything(ctx)
        what = f"group coordinator of {ctx.ns}-app"

        def moved() -> Awaitable[int]:
            return kc.group_coordinator(bootstrap, f"{ctx.ns}-app", timeout_s=5)

    leads = [
        p
        for p in range(ctx.opts.partitions)
        if await kc.partition_leader(bootstrap, topic, p) == node
    ]
    ctx.log("coordinator", node=node, of=what, also_leads_input=leads)
    await _down_and_back(
        ctx, kafka, node, [], ("coordinator kill -9", f"node {node} ({what})", parts), moved
    )


# --------------------------------------------------------------------------- agent_raises


# 200/s: each raise costs the single worker 6-11 s (exit, restart, recovery); at 500/s the
# backlog of one raise had not drained when the next came (at-least-once: 5x the duplicate
# bound), and under exactly-once the worker fell so far behind that no raise fired before
# the 20,000 inputs were issued. At 200/s it kept within ~2 s of the load, 7-9 raises a run.
@scenario("agent_raises", hooks=RaisePlan, workers=1, partitions=4, runs=3, rate=200.0)
async def agent_raises(ctx: RunContext) -> None:
    """The enforce_policy agent body raises outside `guarded` (`InjectedFault` from the
    product's test hook `fault_point("enforce_policy.publish")`, at the start of a
    batch's publish, through AGENTSTREAM_TEST_FAULTS): every worker process is launched
    with the fault at a call number of its own, drawn so that it fires a few seconds to a
    minute after Ready (3-10% of the load's duration), so a run sees several raises;
    processes launched once the whole load is issued get none. Proves: the batch in hand
    is not acknowledged — the worker exits by itself with a non-zero code within 30 s of
    the raise (checked from its log and exit code), the supervisor restarts it, and its
    inputs are processed again: nothing lost, exactly-once leaves no duplicate
    (at-least-once: duplicates within one commit interval per raise). Each raise is a
    fault: resume_after_kill_s = raise -> first decision produced after it on a
    partition the worker held. Fails when no raise happened."""
    await ctx.load.reached(1.0)


# --------------------------------------------------------------------------- llm_saturated


# 200/s, not more: what the scenario shows is that enforce_policy keeps its pace while every
# LLM slot is busy. Under exactly-once it no longer did at 300/s (265 decisions/s, pauses of
# 3.9 s, 2,300 inputs behind when the LLM recovered) nor at 500/s (143/s, 8 s pauses),
# although both passed their checks; at-least-once kept up at 500/s.
@scenario("llm_saturated", hooks=LlmSaturation, workers=1, partitions=4, runs=3, rate=200.0)
async def llm_saturated(ctx: RunContext) -> None:
    """The LLM stage at its concurrency limit while the agent.message load (and, under
    exactly-once, its transactions) runs: the worker runs agents.security and agents.llm
    against a loopback OpenAI-style server started by the run (tests/llm_server.py) with
    4 call slots per worker; while the loads run the server answers every call after
    0.8 s and a quarter of them at once with 429 (Retry-After 0.3 s, honoured while the
    slot stays taken; 8 attempts, the breaker kept closed), and `llm.request` events
    arrive (one per 20 agent.messages, same pace) faster than the slots serve them, so
    every slot is busy and requests wait in Kafka; then it answers at once and the
    backlog drains. Proves: every request id ends in exactly one final llm.responses
    event (completed, or failed with its typed error; >= 95% completed) or a dead
    letter — none lost, no well-formed one dead-lettered; the provider never sees more
    calls at once than the slots allow and does see that many (saturated); the
    agent.message checks still pass. LLM outputs are at-least-once by design, under
    exactly-once too (docs/guarantees.md: call_llm holds a request's offset past its batch,
    outside the commit gate): duplicate final responses are counted under both
    guarantees and judged against the at-least-once bound (one commit interval's worth
    of responses per fault), a failure above it. Notes the decision rate during the
    saturation."""
    llm = ctx.hooks
    if not isinstance(llm, LlmSaturation):
        raise RuntimeError("llm_saturated runs with its LlmSaturation hooks")
    rate = _Rate(ctx)
    llm_load = llm.start_load()
    ctx.fault(
        "llm saturated",
        f"{PROVIDER}: {SLOTS} slot(s)/worker, {CALL_S}s calls, {RATE_LIMITED:.0%} answered 429",
        frozenset(),
    )
    issued = asyncio.gather(ctx.load.reached(1.0), llm_load.reached(1.0))
    t0 = time.time()
    await llm.saturate(issued)
    during = rate.since()
    pending = ctx.collector.pending(ctx.load.total)
    seen = sorted({d.seen_at for d in ctx.collector.decisions() if d.seen_at >= t0})
    marks = [t0, *seen, time.time()]
    pause = max(b - a for a, b in itertools.pairwise(marks))
    ctx.log("llm answers at once again", after_s=round(llm.saturated_s, 1), pending=pending)
    ctx.note(
        f"llm_saturated: decisions/s while saturated {during:.0f} (agent.message input rate "
        f"{ctx.opts.rate:.0f}/s), longest pause between visible decisions {pause:.1f}s, "
        f"{pending} input(s) without an outcome when the LLM answered at once again"
    )


# --------------------------------------------------------------------------- hooks
# (none left: every registered scenario runs; `hook(...)` registers the next one)
