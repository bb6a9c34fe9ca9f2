"""One chaos run: a fresh namespace on a broker, signed policies and identities, the
chain key published, N workers of one group, the load, a scenario's faults, the drain,
then the checks (checker, `agentstream rebuild --all`, `agentstream audit verify`)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import resource
import signal
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import orjson

from agentstream.streams.settings import (
    DELIVERY_VAR,
    Settings,
    child_environ,
    native_delivery,
)
from tests.chaos import checker
from tests.chaos.checker import BLOCKED_WORD
from tests.chaos.cluster import ChaosWorker, OwnBroker, OwnKafka
from tests.chaos.collect import INPUT_TOPIC, Collector, GroupWatcher, stop_task
from tests.chaos.load import Load
from tests.support import (
    REPO,
    AdminSigner,
    await_until,
    cli,
    restartable_port,
    with_admin_key,
)

GUARANTEES = (checker.AT_LEAST_ONCE, checker.EXACTLY_ONCE)
#: Faust's broker_commit_interval in streams/app.py (the at-least-once duplicate bound)
COMMIT_INTERVAL_S = 1.0
#: the worker's session timeout when a run does not set one (the setting's default)
DEFAULT_SESSION_TIMEOUT_S = Settings.model_fields["broker_session_timeout_s"].default
SENDERS = 24
#: how long the reader may take, after the workers stopped, to reach the topics' ends
#: (seconds of reading at most; a broker still recovering gets the rest)
READ_TO_END_S = 60.0
#: the goal for a worker's kill -9: every partition it held has output again this soon
#: (a run fails past it); other faults' resume times are reported, not judged
RESUME_GOAL_S = 15.0
#: the fault kinds RESUME_GOAL_S judges
KILL_KINDS = frozenset({"kill -9"})
T = TypeVar("T")


def free_port() -> int:
    """A worker's web port: a killed worker restarts on it (`restartable_port`)."""
    return restartable_port()


@dataclass
class RunOptions:
    """What one run is: the scenario's shape and the runner's knobs."""

    scenario: str
    guarantee: str
    messages: int
    out_dir: Path
    bootstrap: str
    workers: int = 1
    partitions: int = 4
    rate: float = 500.0
    poison_ratio: float = 0.0
    standby_replicas: int = 0
    #: AGENTSTREAM_BROKER_SESSION_TIMEOUT_S for the workers (None: the setting's default)
    session_timeout_s: float | None = 10.0
    drain_timeout_s: float = 180.0
    #: how long a restarted worker may take to be Ready (a crash loop never is)
    ready_timeout_s: float = 120.0
    #: the scenario's faults are cut off after this long (None: no limit)
    faults_deadline_s: float | None = None
    #: a worker's kill -9 fails the run when its partitions resume later than this
    resume_goal_s: float = RESUME_GOAL_S
    seed: int | None = None
    keep_topics: bool = False
    #: print fault events as they happen
    verbose: bool = False
    #: the broker the run is on, when the suite owns it (scenarios may kill it)
    broker: OwnBroker | OwnKafka | None = None
    extra_env: dict[str, str] = field(default_factory=dict)
    #: the workers' delivery path (their AGENTSTREAM_DELIVERY); None keeps what the
    #: caller's environment says
    delivery: str | None = None


#: what a worker logs when an agent takes its records on the native path
NATIVE_MARK = "batch-native delivery for"


def delivery_check(native: bool, logs: dict[str, str]) -> str | None:
    """Why the workers' logs (name -> text) do not show the delivery path the run was
    made on, or None: on the native path every worker logs `NATIVE_MARK`, on the
    per-record one none does. A report's figures are the path's it names, or fail."""
    marked = sorted(name for name, text in logs.items() if NATIVE_MARK in text)
    if native and len(marked) < len(logs):
        missing = sorted(set(logs) - set(marked))
        return f"run on the native delivery path, but {missing} never logged it"
    if not native and marked:
        return f"run on the per-record delivery path, but {marked} logged the native one"
    return None


class RunHooks:
    """What a scenario may add to a run besides its faults (`scenarios.scenario(...,
    hooks=...)`; one instance per run, as `RunContext.hooks`): `setup` runs before the
    workers start (their `env` may still change, a worker may be replaced by a
    subclass), `drained` is an extra condition of the drain, `check` returns sections
    of the run's result ({name: {..., "failures": [...]}}: their failures fail the run)
    once the workers stopped, before the outputs are checked (so it may still record
    the faults it saw), and `teardown` runs last, whatever happened."""

    async def setup(self, ctx: RunContext) -> None:
        return None

    def drained(self, ctx: RunContext) -> bool:
        return True

    async def check(self, ctx: RunContext) -> dict[str, Any]:
        return {}

    async def teardown(self, ctx: RunContext) -> None:
        return None


@dataclass
class RunContext:
    """What a scenario function gets: the workers, the load, the group's assignment, and
    ways to inject faults that are recorded for the report."""

    opts: RunOptions
    ns: str
    env: dict[str, str]
    cli_env: dict[str, str]
    workers: list[ChaosWorker]
    load: Load
    collector: Collector
    watch: GroupWatcher
    rng: random.Random
    faults: list[checker.FaultMark] = field(default_factory=list)
    #: evidence a fault did not take effect (`fail`): each fails the run
    fault_failures: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)
    t0: float = field(default_factory=time.time)
    ready_timeout_s: float = 120.0
    hooks: RunHooks = field(default_factory=RunHooks)

    @property
    def session_timeout_s(self) -> float:
        return self.opts.session_timeout_s or DEFAULT_SESSION_TIMEOUT_S

    @property
    def broker(self) -> OwnBroker | OwnKafka | None:
        return self.opts.broker

    def log(self, what: str, **kw: Any) -> None:
        event = {"t": round(time.time() - self.t0, 3), "what": what, **kw}
        self.events.append(event)
        if self.opts.verbose:
            extra = " ".join(f"{k}={v}" for k, v in kw.items())
            print(
                f"    [{event['t']:7.1f}s] {what} {extra} (sent {self.load.issued}, "
                f"pending {self.collector.pending()})",
                flush=True,
            )

    def note(self, text: str) -> None:
        if text not in self.notes:
            self.notes.append(text)

    def fail(self, text: str) -> None:
        """The run's fault did not take effect as the scenario claims (a run that passes
        because its fault never reached the workers proves nothing): the run fails."""
        self.fault_failures.append(text)
        self.log("fault without its effect", why=text)

    def fault(
        self, kind: str, target: str, partitions: frozenset[int], at: float | None = None
    ) -> checker.FaultMark:
        """Record a fault (now, or at wall time `at` when it was seen after the fact)."""
        mark = checker.FaultMark(kind, target, time.time() if at is None else at, partitions)
        self.faults.append(mark)
        extra = {} if at is None else {"at_s": round(at - self.t0, 3)}
        self.log(kind, target=target, partitions=sorted(partitions), **extra)
        return mark

    async def kill_worker(self, w: ChaosWorker) -> checker.FaultMark:
        """kill -9 `w` (left down: restart it with `restart_worker`)."""
        w.expected_down = True
        partitions = self.watch.partitions(w.port)
        await asyncio.to_thread(w.kill)  # returns once the process is gone
        # marked after: an output the worker produced before it died is no resume
        return self.fault("kill -9", w.name, partitions)

    async def restart_worker(self, w: ChaosWorker, wait_ready: bool = True) -> None:
        w.launch()
        self.log("restart", target=w.name)
        try:
            if wait_ready:
                await w.ready(timeout=self.ready_timeout_s)
                self.log("ready", target=w.name)
        except AssertionError:
            # a crash loop: the run goes on (the supervisor keeps restarting it) and the
            # drain deadline decides; the crash reasons are in the notes
            self.log("not ready", target=w.name, after_s=self.ready_timeout_s)
            self.note(f"{w.name} not Ready within {self.ready_timeout_s:.0f}s of a restart")
        finally:
            w.expected_down = False

    async def wait_all_ready(self, timeout: float = 120) -> bool:
        """Every worker running and Ready (a crashed one relaunched); False if one is not
        within `timeout` (a crash loop)."""
        try:
            await asyncio.gather(*(w.ready(timeout) for w in self.workers))
            return True
        except AssertionError:
            self.note(f"not every worker Ready within {timeout:.0f}s after the faults")
            return False


ScenarioFunc = Callable[[RunContext], Awaitable[None]]


def _base_env(opts: RunOptions, ns: str) -> dict[str, str]:
    env = child_environ(os.environ)
    env.update(
        {
            "AGENTSTREAM_KAFKA_BOOTSTRAP": opts.bootstrap,
            "AGENTSTREAM_TOPIC_PREFIX": f"{ns}.",
            "AGENTSTREAM_APP_ID": f"{ns}-app",
            "AGENTSTREAM_TOPIC_PARTITIONS": str(opts.partitions),
            "AGENTSTREAM_LOG_LEVEL": "INFO",
            "AGENTSTREAM_STANDBY_REPLICAS": str(opts.standby_replicas),
            "AGENTSTREAM_AGENTS": "security",
            "AGENTSTREAM_PROCESSING_GUARANTEE": opts.guarantee,
            "AGENTSTREAM_CHECKPOINT_INTERVAL_S": "3600",
            "AGENTSTREAM_DATA_DIR": str(opts.out_dir / "cli-data"),
            "AGENTSTREAM_WEB_PORT": str(free_port()),
            "PYTHONPATH": str(REPO),
        }
    )
    if opts.session_timeout_s is not None:
        env["AGENTSTREAM_BROKER_SESSION_TIMEOUT_S"] = str(opts.session_timeout_s)
    env.update(opts.extra_env)
    if opts.delivery is not None:
        env[DELIVERY_VAR] = opts.delivery
    return env


async def _signed_setup(env: dict[str, str], signer: AdminSigner) -> None:
    """Admin-signed policy, config and identities on their topics (as in
    tests/security/test_pipeline_attacks.py)."""
    from aiokafka import AIOKafkaProducer

    from agentstream.schemas.security import AgentIdentity, SecurityConfig, SecurityPolicy
    from agentstream.streams.admin import ensure_topics
    from agentstream.streams.settings import Settings
    from agentstream.streams.topics import SECURITY_IDENTITIES, SECURITY_POLICIES

    settings = Settings.from_env(env)
    await ensure_topics(settings)
    producer = AIOKafkaProducer(bootstrap_servers=settings.bootstrap, acks="all")
    await producer.start()
    try:
        rules = [
            SecurityPolicy(policy_id="chaos-std", level="*", blocked_patterns=[BLOCKED_WORD]),
            SecurityConfig(default_action="deny"),
        ]
        for payload in rules:
            key, value = signer.record(payload)
            await producer.send_and_wait(settings.topic(SECURITY_POLICIES), value, key=key)
        for n in range(SENDERS):
            key, value = signer.record(AgentIdentity(agent_id=f"agent-{n}", roles=["agent"]))
            await producer.send_and_wait(settings.topic(SECURITY_IDENTITIES), value, key=key)
    finally:
        await producer.stop()


async def _cli(env: dict[str, str], *args: str, timeout: float = 300) -> Any:
    return await asyncio.to_thread(cli, env, *args, timeout=timeout)


async def _delete_topics(bootstrap: str, ns: str) -> None:
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        await admin.start()
        mine = [t for t in await admin.list_topics() if t.startswith(ns)]
        if mine:
            await admin.delete_topics(mine)
    except Exception as exc:
        print(f"topic cleanup for {ns} failed: {exc!r}")
    finally:
        with contextlib.suppress(Exception):
            await admin.close()


async def _supervise(ctx: RunContext) -> None:
    """Restart a worker that exited on its own (as a process supervisor would), unless a
    scenario is restarting it itself."""
    while True:
        for w in ctx.workers:
            code = w.reap()
            if code is not None:
                ctx.log("crash", target=w.name, code=code)
                ctx.note(f"{w.name} exited by itself (code {code}); restarted by the supervisor")
                await asyncio.sleep(1.0)
                if w.waiting or w.alive():
                    # a `ready()` began waiting meanwhile: it relaunches the dead process
                    # itself (a second launch would run two processes of one worker, the
                    # first one orphaned)
                    continue
                w.launch()
        await asyncio.sleep(0.5)


def _cpu_now(broker: OwnBroker | OwnKafka | None) -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    total = own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime
    return total + (broker.cpu_seconds() if broker is not None else 0.0)


async def run_once(opts: RunOptions, scenario: ScenarioFunc) -> dict[str, Any]:
    """Run `scenario` once under `opts`; returns the run's result (also written as
    run.json in its directory)."""
    ns = f"chaos{uuid.uuid4().hex[:8]}"
    run_dir = opts.out_dir.resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "keyring.json").unlink(missing_ok=True)  # a fresh keychain per run
    seed = opts.seed if opts.seed is not None else random.randrange(1 << 30)
    signer = AdminSigner()
    env = with_admin_key(_base_env(opts, ns), run_dir, signer)
    cli_env = {**env, "AGENTSTREAM_AGENTS": "security,audit"}
    cpu0 = _cpu_now(opts.broker)
    started = time.time()
    await _signed_setup(env, signer)
    # the chain key every worker signs with (they share the keychain), published
    # admin-signed before any worker writes, so `audit verify` trusts their signatures
    pub = await _cli(cli_env, "audit", "worker-key", "publish")
    if pub.returncode != 0:
        raise RuntimeError(f"worker-key publish failed: {pub.stdout}{pub.stderr}")

    workers = []
    for i in range(opts.workers):
        wenv = {
            **env,
            "AGENTSTREAM_DATA_DIR": str(run_dir / f"w{i}"),
            "AGENTSTREAM_WEB_PORT": str(free_port()),
            "AGENTSTREAM_WORKER_ID": f"{ns}-w{i}",
            # a worker slot restarted by its supervisor keeps its identity, as a
            # StatefulSet pod does: it gets its partitions back without a rebalance
            "AGENTSTREAM_GROUP_INSTANCE_ID": f"{ns}-w{i}",
        }
        workers.append(ChaosWorker(f"w{i}", wenv, run_dir / f"w{i}.log"))
    prefix = f"{ns}."
    collector = await Collector(opts.bootstrap, prefix).start()
    watch = await GroupWatcher(opts.bootstrap, f"{ns}-app", f"{prefix}{INPUT_TOPIC}").start()
    load = Load(
        bootstrap=opts.bootstrap,
        topic=f"{prefix}{INPUT_TOPIC}",
        total=opts.messages,
        rate=opts.rate,
        tag=ns,
        poison_ratio=opts.poison_ratio,
    )
    ctx = RunContext(
        opts=opts,
        ns=ns,
        env=env,
        cli_env=cli_env,
        workers=workers,
        load=load,
        collector=collector,
        watch=watch,
        rng=random.Random(seed),
        t0=started,
        ready_timeout_s=opts.ready_timeout_s,
    )
    hooks_factory: Callable[[], RunHooks] | None = getattr(scenario, "hooks", None)
    if hooks_factory is not None:
        ctx.hooks = hooks_factory()
    ctx.log("setup done", seed=seed)
    result: dict[str, Any] = {
        "scenario": opts.scenario,
        "guarantee": opts.guarantee,
        "namespace": ns,
        "seed": seed,
        "messages": opts.messages,
        "workers": opts.workers,
        "partitions": opts.partitions,
        "rate": opts.rate,
        "session_timeout_s": ctx.session_timeout_s,
        "dir": str(run_dir),
    }
    error: str | None = None
    try:
        await _load_and_faults(ctx, scenario, result)
    except Exception as exc:
        error = f"{type(exc).__name__}: {exc}"
        ctx.note(f"run aborted: {error}"[:2000])
    except BaseException:
        # interrupted (Ctrl-C, SIGTERM): the workers are stopped, the run is not recorded
        await _release(ctx)
        raise
    try:
        result.update(await _post_checks(ctx, result))
    except Exception as exc:
        # recorded as a failed run: not left for --resume to make again until it passes
        result.update(ok=False, failures=[f"post-run checks failed: {exc!r}"[:2000]])
    finally:
        await _release(ctx)
    if error:
        result["error"] = error
        result["ok"] = False
    result["cpu_s"] = round(_cpu_now(opts.broker) - cpu0, 1)
    result["wall_s"] = round(time.time() - started, 1)
    result["notes"] = ctx.notes
    result["events"] = ctx.events
    result["workers_detail"] = {
        w.name: {
            "starts": w.starts,
            "kills": w.kills,
            "crashes": w.crashes,
            "crash_reasons": w.crash_reasons(),
        }
        for w in workers
    }
    reasons: dict[str, int] = {}
    for w in workers:
        for reason, n in w.crash_reasons().items():
            reasons[reason] = reasons.get(reason, 0) + n
    for reason, n in reasons.items():
        if reason.startswith("BatchAbandoned"):
            # Faust's "Crashed" of an agent restarted by design: a revoke took the
            # partitions of its batch, which the next owner processes (delivery.py, 3)
            ctx.note(f"agent restarted on a revoke x{n} (a batch abandoned, not acked)")
        else:
            ctx.note(f"agent or worker crash x{n}: {reason}")
    result["load"] = {
        "acked": load.acked,
        "resent": load.resent,
        "unsent": load.unsent,
        "send_errors": load.send_errors[:5],
    }
    (run_dir / "run.json").write_text(json.dumps(result, indent=1, default=str))
    return result


async def _load_and_faults(ctx: RunContext, scenario: ScenarioFunc, result: dict[str, Any]) -> None:
    """The workers, the load and the scenario's faults, then the drain (recorded in
    `result`); the workers are stopped when it returns or raises."""
    opts, workers, watch, collector, load = (
        ctx.opts,
        ctx.workers,
        ctx.watch,
        ctx.collector,
        ctx.load,
    )
    supervisor: asyncio.Task[None] | None = None
    load_task: asyncio.Task[None] | None = None
    try:
        await ctx.hooks.setup(ctx)
        # a first start recovers nothing: bounded like a restart (a run that cannot start
        # fails with its workers' logs instead of waiting out a caller's timeout)
        await asyncio.gather(*(w.start_async(max(60.0, opts.ready_timeout_s)) for w in workers))
        ctx.log("workers ready")
        # the first assignment, so the first fault knows whose partitions it takes
        with contextlib.suppress(AssertionError):
            await await_until(lambda: len(watch.by_port) == len(workers), 60, 0.5)
        supervisor = asyncio.create_task(_supervise(ctx))
        load_task = asyncio.create_task(load.run())
        try:
            await asyncio.wait_for(scenario(ctx), opts.faults_deadline_s)
        except TimeoutError:
            ctx.note(f"the faults were cut off after {opts.faults_deadline_s:.0f}s")
            for w in workers:
                w.expected_down = False  # the supervisor's again
        faults_done = time.time()
        ctx.log("faults done")
        await load_task
        ctx.log("load done", acked=load.acked, resent=load.resent, unsent=load.unsent)
        await ctx.wait_all_ready(opts.ready_timeout_s)
        drain_from = max(faults_done, load.finished_at)
        # the load and the faults: what the rest of the run (its overhead) is measured from
        result["load_phase_s"] = round(drain_from - load.started_at, 1)
        drained = await _drain(ctx, opts.drain_timeout_s)
        drain_s = (drained - drain_from) if drained else None
        result["drain_s"] = None if drain_s is None else round(max(0.0, drain_s), 2)
        result["drained"] = drained is not None
        ctx.log("drained" if drained else "drain timed out")
        if drained is None:
            # what each stuck worker holds: its consumer's positions, read, acked and
            # committed offsets and its agents' marks (streams.diagnostics), in its log
            live = [w for w in ctx.workers if w.alive() and w.proc is not None]
            await dump_delivery_state([(w.proc.pid, w.log_path) for w in live], 10)  # type: ignore[union-attr]
        # a quiet period shows trailing duplicates too
        with contextlib.suppress(AssertionError):
            await await_until(lambda: time.time() - collector.last_record_at > 3.0, 20, 0.5)
        end = drained or time.time()
        result["throughput_eps"] = round(
            len(collector.input_ids) / max(1e-3, end - load.started_at), 1
        )
    finally:
        for task in (supervisor, load_task):
            if task is not None and not task.done():
                await stop_task(task)
        # first, and to their end even if the run is interrupted meanwhile: the workers
        # run in sessions of their own, nothing else would stop them
        await uninterrupted(asyncio.gather(*(asyncio.to_thread(_stop, w) for w in workers)))
        await watch.stop()


async def dump_delivery_state(workers: list[tuple[int, Path]], timeout: float) -> None:
    """Ask each worker, (pid, log), for its delivery state (SIGUSR2,
    `streams.diagnostics`) and wait at most `timeout` until each log holds one more dump:
    written from the worker's loop, a stuck loop never writes it."""
    from agentstream.streams.diagnostics import MARK

    end = b"end of " + MARK.encode()
    asked: dict[Path, int] = {}
    for pid, log in workers:
        before = log.read_bytes().count(end)
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGUSR2)
            asked[log] = before

    def dumped() -> bool:
        return all(log.read_bytes().count(end) > n for log, n in asked.items())

    with contextlib.suppress(AssertionError):
        await await_until(dumped, timeout, 0.2)


async def _release(ctx: RunContext) -> None:
    """What a run holds in this process, released whatever happened: the scenario's
    tear-down, the collector, the run's topics (unless kept)."""
    try:
        await ctx.hooks.teardown(ctx)
    except Exception as exc:
        ctx.note(f"scenario teardown failed: {exc!r}"[:2000])
    await ctx.collector.stop()
    if not ctx.opts.keep_topics:
        await _delete_topics(ctx.opts.bootstrap, ctx.ns)


async def uninterrupted(aw: Awaitable[T]) -> T:
    """Await `aw` to its end even when the awaiting task is cancelled meanwhile (the
    cancellation is raised after it): for stopping processes on an interruption."""
    fut = asyncio.ensure_future(aw)
    try:
        return await asyncio.shield(fut)
    except asyncio.CancelledError:
        await fut
        raise


def _stop(w: ChaosWorker) -> None:
    if w.proc is not None and w.proc.poll() is None:
        with contextlib.suppress(Exception):
            w.resume()  # a SIGSTOP'ed worker would ignore SIGTERM
    w.stop(30)


async def _drain(ctx: RunContext, timeout: float) -> float | None:
    """Wall time at which every input record had its outcome and every decodable one
    its decision, or None at the deadline."""
    col = ctx.collector
    total = ctx.load.total

    def done() -> bool:
        if len(col.input_ids) < total or col.pending(total) or col.undecided():
            return False
        return ctx.hooks.drained(ctx)

    try:
        await await_until(done, timeout, 0.5)
        return time.time()
    except AssertionError:
        return None


async def _post_checks(ctx: RunContext, result: dict[str, Any]) -> dict[str, Any]:
    opts = ctx.opts
    col = ctx.collector
    out: dict[str, Any] = {}
    # the workers are stopped: read to the end (their last commits) before judging
    caught_up = await col.caught_up(READ_TO_END_S)
    # first: a scenario's own check may still record the faults it saw (resume, bound)
    try:
        extra = await ctx.hooks.check(ctx)
    except Exception as exc:
        extra = {"scenario_check": {"failures": [f"failed: {exc!r}"[:2000]]}}
    res = checker.check(
        col.inputs,
        col.outputs,
        guarantee=opts.guarantee,
        input_topic=col.input_topic,
        faults=len(ctx.faults),
        throughput_eps=result.get("throughput_eps"),
        commit_interval_s=COMMIT_INTERVAL_S,
    )
    out["check"] = res.to_dict()
    resumes = checker.resume_times(ctx.faults, col.decisions())
    out["faults"] = [
        {
            "kind": f.kind,
            "target": f.target,
            "at_s": round(f.at - ctx.t0, 2),
            "partitions": sorted(f.partitions),
            "resume_s": None if r is None else round(r, 2),
        }
        for f, r in zip(ctx.faults, resumes, strict=True)
    ]
    measured = [
        r for r, f in zip(resumes, ctx.faults, strict=True) if r is not None and f.partitions
    ]
    out["resume_after_kill_s"] = measured
    slow = [
        f"{f.kind} of {f.target} at {f.at - ctx.t0:.0f}s: {r:.1f}s"
        for f, r in zip(ctx.faults, resumes, strict=True)
        if f.kind in KILL_KINDS and r is not None and r > opts.resume_goal_s
    ]
    if any(f.partitions and r is None for f, r in zip(ctx.faults, resumes, strict=True)):
        ctx.note("a fault's partitions saw no output produced after it (resume not measured)")
    if col.garbage:
        ctx.note(f"records that are not events: {dict(col.garbage)}")

    rebuild = await _cli(ctx.cli_env, "rebuild", "--all", "--json")
    rv = checker.judge_rebuild(rebuild.stdout.splitlines(), opts.guarantee, rebuild.returncode)
    if not rv.details.get("compared"):
        rv.details["stderr"] = rebuild.stderr[-1500:]
    out["rebuild"] = {"ok": rv.ok, "summary": rv.summary, "tolerated": rv.tolerated, **rv.details}
    audit = await _cli(ctx.cli_env, "audit", "verify", "--json")
    doc = None
    with contextlib.suppress(orjson.JSONDecodeError):
        doc = orjson.loads(audit.stdout) if audit.stdout.strip() else None
    crashed = any(w.kills or w.crashes for w in ctx.workers) or any(
        f.kind == "agent raised" for f in ctx.faults
    )
    av = checker.judge_audit(doc, opts.guarantee, crashed)
    out["audit"] = {"ok": av.ok, "summary": av.summary, "tolerated": av.tolerated, **av.details}
    if doc is None:
        out["audit"]["stderr"] = audit.stderr[-1500:]
    for name, verdict in (("rebuild", rv), ("audit verify", av)):
        if verdict.tolerated:
            ctx.note(f"{name}: {verdict.summary} — tolerated: {verdict.tolerated}")
    failures = list(res.failures)
    for key, value in extra.items():
        out[key] = value
        if isinstance(value, dict):
            failures += [f"{key}: {f}" for f in value.get("failures", [])]
    if not rv.ok:
        failures.append(f"rebuild: {rv.summary}")
    if not av.ok:
        failures.append(f"audit verify: {av.summary}")
    failures += [f"fault effect: {text}" for text in ctx.fault_failures]
    out["fault_effect_failures"] = list(ctx.fault_failures)
    native = any(native_delivery(w.env) for w in ctx.workers)
    out["delivery"] = "native" if native else "per-record"
    logs = {
        w.name: w.log_path.read_text(errors="replace") if w.log_path.exists() else ""
        for w in ctx.workers
    }
    wrong_path = delivery_check(native, logs)
    if wrong_path is not None:
        failures.append(wrong_path)
    expected_poison = int(opts.messages * opts.poison_ratio)
    if res.poison_inputs < 0.9 * expected_poison:
        failures.append(
            f"fault effect: {res.poison_inputs} poison input(s) on the topic, "
            f"{expected_poison} expected"
        )
    if slow:
        failures.append(
            f"resume over {opts.resume_goal_s:.0f}s after {len(slow)} kill(s): {slow[:3]}"
        )
    if not caught_up:
        failures.append(f"the reader did not reach the end of the topics in {READ_TO_END_S:.0f}s")
    if result.get("drain_s") is None and "drain_s" in result:
        failures.append(f"not drained within {opts.drain_timeout_s:.0f}s")
    out["failures"] = failures
    out["ok"] = not failures
    return out
