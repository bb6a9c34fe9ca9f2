"""The fault scenarios and their registry.

A scenario is an async function of a `RunContext` that injects its faults while the load
runs (fault moments follow the load's progress, so they land mid-stream whatever the
machine's speed) and returns when its faults are over; the harness then drains the
pipeline and checks it. Its docstring says what a passing run proves. Scenarios whose
infrastructure or fault hook does not exist yet are registered as hooks (`needs` says
what is missing) and reported as skipped."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tests.chaos.harness import RunContext, ScenarioFunc


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
    #: what is missing before the scenario can run (None: implemented)
    needs: str | None = None

    @property
    def implemented(self) -> bool:
        return self.func is not None and self.needs is None


SCENARIOS: dict[str, Scenario] = {}


def scenario(name: str, **kw: Any) -> Callable[[ScenarioFunc], ScenarioFunc]:
    def register(func: ScenarioFunc) -> ScenarioFunc:
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
    ctx.fault("SIGSTOP", w.name, ctx.watch.partitions(w.port))
    w.suspend()
    try:
        await asyncio.sleep(ctx.session_timeout_s + 5.0)
    finally:
        w.resume()
        ctx.log("SIGCONT", target=w.name)


# --------------------------------------------------------------------------- broker_restart


@scenario("broker_restart", workers=2, partitions=4, runs=3, rate=500.0, own_broker=True)
async def broker_restart(ctx: RunContext) -> None:
    """The (single) broker kill -9'ed mid-load and restarted on the same data dir (log
    recovery after an unclean stop). Proves: producer, workers and consumer group come
    back by themselves (a worker that dies is restarted as by a supervisor), no
    acknowledged input is lost, exactly-once writes no committed duplicate, and chains
    and tables stay consistent. resume_after_kill_s here is kill -> first output after."""
    broker = ctx.broker
    if broker is None:
        raise RuntimeError("broker_restart needs a broker of its own")
    await ctx.load.reached(ctx.rng.uniform(0.3, 0.5))
    everything = frozenset(range(ctx.opts.partitions))
    ctx.fault("broker kill -9", "broker", everything)
    await asyncio.to_thread(broker.kill)
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
        await admin.alter_configs([resource])
    finally:
        await admin.close()


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
    ctx.fault("output refused", topic, frozenset(range(ctx.opts.partitions)))
    await _set_max_message_bytes(ctx.opts.bootstrap, topic, 300)
    await asyncio.sleep(10.0)
    await _set_max_message_bytes(ctx.opts.bootstrap, topic, 1_048_588)
    ctx.log("output accepted again")


# --------------------------------------------------------------------------- hooks

TOXIPROXY = "Toxiproxy between workers and broker (infra/toxiproxy/, not there yet)"
CLUSTER = "a 3-node KRaft cluster (infra/kafka/launcher.py cluster mode, not there yet)"

hook(
    "network_latency",
    TOXIPROXY,
    "200 ms +- 100 ms latency on every worker<->broker connection for 60 s mid-load: "
    "no loss, no exactly-once duplicate; measures the throughput dip.",
)
hook(
    "network_bandwidth",
    TOXIPROXY,
    "Bandwidth capped at 64 KB/s for 60 s: producers back-pressure, nothing lost.",
)
hook(
    "network_reset",
    TOXIPROXY,
    "Connections reset (reset_peer) every few seconds for 60 s: clients reconnect, "
    "idempotent producers do not duplicate, nothing lost.",
)
hook(
    "network_blackhole",
    TOXIPROXY,
    "A 30 s blackhole (timeout toxic) between one worker and the broker: its partitions "
    "move, the worker is fenced when it comes back; exactly-once: no duplicate.",
)
hook(
    "leader_kill",
    CLUSTER,
    "kill -9 of the leader of the input partitions on a 3-node cluster (RF 3, "
    "min.insync.replicas 2): leadership moves, no acknowledged input lost.",
)
hook(
    "coordinator_kill",
    CLUSTER,
    "kill -9 of the group/transaction coordinator: the group and its transactions move "
    "to another node; no loss, exactly-once: no duplicate.",
)
hook(
    "agent_raises",
    "a fault hook that makes an agent body raise outside `guarded` (none in agents/ or "
    "streams/ yet)",
    "enforce_policy raises outside `guarded` on some batches: the batch must not be "
    "acknowledged (today it is: loss, the known issue), the worker restarts, nothing lost.",
)
hook(
    "llm_saturated",
    "agents.llm against a saturating provider (tests/llm_server.py) and a checker for "
    "llm.requests -> llm.responses",
    "The LLM provider at its concurrency limit with 429s: requests wait, none is lost, "
    "one final response per request.",
)
