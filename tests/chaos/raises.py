"""`agent_raises`: the enforce_policy agent body raises outside `guarded`.

The product's test hook `streams.processing.fault_point("enforce_policy.publish")`
(called once per batch, at the start of `_publish`) raises `InjectedFault` at its first
call T seconds or more after its first call when the worker runs with
``AGENTSTREAM_TEST_FAULTS=enforce_policy.publish@Ts``. Every worker process of the run is
launched with its own T (`RaisingWorker.launch`), a random share of the load's duration:
a time, not a call number, so the raise lands within the load whatever the batch rate
(the per-record and the native delivery paths cut the same load into very different
numbers of batches). A process launched once the whole load is issued gets no fault, so
the drain is not interrupted by new raises.

`RaiseHooks` follows every process: when one ends it reads that process's part of the
worker log for the raise (its timestamp) and records the raise as a fault at that moment,
on the partitions the worker held (resume = raise -> first decision produced after it on
one of them). What the product must do about a raise, checked here: the worker exits by
itself with a non-zero code soon after the raise (the supervisor restarts it); what the
outputs must show (nothing lost, no exactly-once duplicate) is the harness's checker.
"""

from __future__ import annotations

import asyncio
import re
import subprocess
import time
from dataclasses import dataclass
from typing import Any

from tests.chaos.cluster import ChaosWorker
from tests.chaos.collect import stop_task
from tests.chaos.harness import RunContext, RunHooks

FAULT_ENV = "AGENTSTREAM_TEST_FAULTS"
FAULT_POINT = "enforce_policy.publish"
#: a raise must end its process within this long (it crashes the worker)
RAISE_EXIT_S = 30.0
#: a process raises this long after its first batch, as a share of the load's duration,
#: within [MIN_GAP_S, MAX_GAP_S] (at least a few seconds: a raise in the first batches
#: after recovery would test recovery, not a raise under load)
GAP_SHARE = (0.03, 0.10)
MIN_GAP_S, MAX_GAP_S = 3.0, 60.0

_STAMP = r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3})\]"
_RAISE = re.compile(
    _STAMP + r"[^\n]*injected fault at " + re.escape(FAULT_POINT) + r" \(call (\d+)\)",
    re.MULTILINE,
)
_READY = re.compile(_STAMP + r"[^\n]*\[\^Worker\]: Ready", re.MULTILINE)


def _wall(date: str, ms: str) -> float:
    """A worker log timestamp (local time, Faust's format) as wall-clock seconds."""
    return time.mktime(time.strptime(date, "%Y-%m-%d %H:%M:%S")) + int(ms) / 1000


def parse_life(text: str) -> tuple[float | None, float | None, int | None]:
    """(Ready at, raised at, call number of the raise) in one process's log text."""
    ready = _READY.search(text)
    raised = _RAISE.search(text)
    return (
        _wall(*ready.groups()) if ready else None,
        _wall(*raised.groups()[:2]) if raised else None,
        int(raised.group(3)) if raised else None,
    )


@dataclass
class Life:
    """One process of a worker."""

    proc: subprocess.Popen[bytes]
    #: where its output starts in the worker's log
    log_from: int
    #: seconds after its first batch at which it raises (None: launched without a fault)
    fault_after_s: float | None
    launched_at: float
    ended_at: float | None = None
    code: int | None = None
    ready_at: float | None = None
    raised_at: float | None = None
    raised_call: int | None = None
    #: the partitions its worker held when the process ended
    partitions: frozenset[int] = frozenset()
    done: bool = False


class RaisingWorker(ChaosWorker):
    """A chaos worker whose every process is launched with a fault of its own."""

    def __init__(self, base: ChaosWorker, plan: RaisePlan) -> None:
        super().__init__(base.name, dict(base.env), base.log_path)
        self.plan = plan
        self.lives: list[Life] = []
        self.stopping = False
        self.double_launches = 0

    def launch(self) -> None:
        if self.alive():
            # a second process of one worker would orphan the first (never stopped)
            self.double_launches += 1
            return
        after = self.plan.arm()
        if after is None:
            self.env.pop(FAULT_ENV, None)
        else:
            self.env[FAULT_ENV] = f"{FAULT_POINT}@{after:.1f}s"
        start = self.log_path.stat().st_size if self.log_path.exists() else 0
        super().launch()
        assert self.proc is not None
        self.lives.append(Life(self.proc, start, after, time.time()))

    def stop(self, timeout: float = 30) -> None:
        self.stopping = True  # what ends now was ended by the harness, not by a raise
        super().stop(timeout)

    def life_text(self, i: int) -> str:
        """Process number i's part of the log."""
        end = self.lives[i + 1].log_from if i + 1 < len(self.lives) else None
        try:
            with self.log_path.open("rb") as f:
                f.seek(self.lives[i].log_from)
                data = f.read() if end is None else f.read(end - self.lives[i].log_from)
        except FileNotFoundError:
            return ""
        return data.decode(errors="replace")


class RaisePlan(RunHooks):
    """The run's raises: arms each launched process (`arm`), follows the processes, and
    records each raise as a fault."""

    def __init__(self) -> None:
        self.ctx: RunContext | None = None
        self.samples: list[float] = []
        self.workers: list[RaisingWorker] = []
        self._task: asyncio.Task[None] | None = None
        self.unexplained_exits = 0

    # -- arming --------------------------------------------------------------------------
    def arm(self) -> float | None:
        """Seconds after its first batch at which a process launched now raises; None
        once the whole load was issued (no new raise during the drain)."""
        ctx = self.ctx
        if ctx is None or ctx.load.issued >= ctx.load.total:
            return None
        load_s = ctx.opts.messages / ctx.opts.rate if ctx.opts.rate > 0 else 60.0
        gap = ctx.rng.uniform(*GAP_SHARE) * load_s
        return min(MAX_GAP_S, max(MIN_GAP_S, gap))

    # -- hooks ---------------------------------------------------------------------------
    async def setup(self, ctx: RunContext) -> None:
        self.ctx = ctx
        for i, w in enumerate(ctx.workers):
            ctx.workers[i] = rw = RaisingWorker(w, self)
            self.workers.append(rw)
        self._task = asyncio.create_task(self._follow(ctx))

    async def _follow(self, ctx: RunContext) -> None:
        while True:
            self.scan(ctx)
            await asyncio.sleep(0.2)

    def scan(self, ctx: RunContext, final: bool = False) -> None:
        """Settle every process that ended since the last scan (all of them when
        `final`: the harness stopped the last ones)."""
        for w in self.workers:
            for i, life in enumerate(w.lives):
                if life.done:
                    continue
                code = life.proc.poll()
                if code is None and not final:
                    continue
                if code is not None and not final and not w.stopping:
                    life.ended_at = time.time()  # by itself
                life.code = code
                life.partitions = ctx.watch.partitions(w.port)
                life.ready_at, life.raised_at, life.raised_call = parse_life(w.life_text(i))
                life.done = True
                self._settled(ctx, w, life, final)

    def _settled(self, ctx: RunContext, w: RaisingWorker, life: Life, final: bool) -> None:
        if life.raised_at is None:
            if life.ended_at is not None:
                self.unexplained_exits += 1
                ctx.log("exit without a raise", target=w.name, code=life.code)
            return
        ctx.fault("agent raised", w.name, life.partitions, at=life.raised_at)
        exit_after = None if life.ended_at is None else life.ended_at - life.raised_at
        ctx.log(
            "raise ended the process" if life.ended_at else "raised, still running at the end",
            target=w.name,
            call=life.raised_call,
            code=life.code,
            exit_after_s=None if exit_after is None else round(exit_after, 2),
        )
        if life.ready_at is not None and life.raised_call and life.raised_at > life.ready_at:
            # for the report: how the delivery path cut the load into batches
            self.samples.append(life.raised_call / (life.raised_at - life.ready_at))

    async def check(self, ctx: RunContext) -> dict[str, Any]:
        task, self._task = self._task, None
        await stop_task(task)
        self.scan(ctx, final=True)
        raises = [life for w in self.workers for life in w.lives if life.raised_at is not None]
        failures: list[str] = []
        if not raises:
            armed = sum(1 for w in self.workers for life in w.lives if life.fault_after_s)
            failures.append(
                f"no raise happened ({armed} process(es) armed): the run tested nothing "
                "(a longer load, --messages, gives the faults time to fire)"
            )
        exits: list[float] = []
        for w in self.workers:
            for life in w.lives:
                if life.raised_at is None:
                    continue
                at = round(life.raised_at - ctx.t0, 1)
                if life.ended_at is None:
                    failures.append(
                        f"{w.name} raised at {at}s and did not exit by itself (the worker "
                        "went on after an abandoned batch)"
                    )
                    continue
                exits.append(life.ended_at - life.raised_at)
                if life.code == 0:
                    failures.append(f"{w.name} raised at {at}s and exited with code 0")
                if life.ended_at - life.raised_at > RAISE_EXIT_S:
                    failures.append(
                        f"{w.name} raised at {at}s and took "
                        f"{life.ended_at - life.raised_at:.0f}s to exit (> {RAISE_EXIT_S:.0f}s)"
                    )
        ctx.note(
            f"agent_raises: {len(raises)} raise(s) in "
            f"{sum(len(w.lives) for w in self.workers)} process(es)"
            + (f"; ~{self.samples[-1]:.1f} enforce_policy batches/s" if self.samples else "")
        )
        if self.unexplained_exits:
            ctx.note(f"agent_raises: {self.unexplained_exits} exit(s) without an injected raise")
        doubles = sum(w.double_launches for w in self.workers)
        if doubles:
            ctx.note(f"agent_raises: {doubles} launch(es) of a running worker skipped")
        return {
            "raises": {
                "count": len(raises),
                "processes": sum(len(w.lives) for w in self.workers),
                "calls": [life.raised_call for life in raises],
                "exit_codes": [life.code for life in raises],
                "raise_to_exit_s": [round(x, 2) for x in exits],
                "batches_per_s": [round(x, 1) for x in self.samples],
                "unexplained_exits": self.unexplained_exits,
                "failures": failures,
            }
        }

    async def teardown(self, ctx: RunContext) -> None:
        task, self._task = self._task, None
        await stop_task(task)
