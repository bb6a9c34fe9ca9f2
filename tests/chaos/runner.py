"""`python -m tests.chaos`: run scenarios K times under one or both guarantees against a
real broker with real workers, then write report.json and report.md."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

from agentstream.streams.settings import DELIVERY_PATHS, DELIVERY_VAR
from tests.chaos import plan
from tests.chaos.cluster import PORT_BASE, OwnBroker, OwnKafka, sweep
from tests.chaos.harness import (
    DEFAULT_SESSION_TIMEOUT_S,
    GUARANTEES,
    RunOptions,
    run_once,
    uninterrupted,
)
from tests.chaos.report import write
from tests.chaos.scenarios import SCENARIOS, Scenario
from tests.support import REPO

DEFAULT_MESSAGES = 100_000
DEFAULT_ORDER = (
    "worker_kill",
    "worker_stop",
    "broker_restart",
    "poison",
    "output_refused",
    "agent_raises",
    "llm_saturated",
    "network_latency",
    "network_bandwidth",
    "network_reset",
    "network_blackhole",
    "leader_kill",
    "coordinator_kill",
)


#: the options a run is made with, recorded in report.json (meta.options) and taken
#: from there by --resume; None where the scenario decides (--runs, --rate, --standby)
DEFAULTS: dict[str, Any] = {
    "scenario": None,
    "runs": None,
    "guarantee": "both",
    "messages": DEFAULT_MESSAGES,
    "rate": None,
    "session_timeout": 10.0,
    "fault_s": None,
    "kills_per_worker": 5,
    "standby": None,
    "drain_timeout": 240.0,
    "seed": None,
    "keep_topics": False,
    "delivery": "native",
}
#: exit code of a command line that cannot be run (argparse's own)
USAGE_ERROR = 2


class OptionConflict(Exception):
    """An explicit option differs from the one the resumed run was started with."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line; every option of DEFAULTS is None unless given (`resolve` fills
    in the defaults, or the resumed run's options)."""
    p = argparse.ArgumentParser(prog="python -m tests.chaos", description=__doc__)
    p.add_argument(
        "--scenario",
        action="append",
        choices=sorted(SCENARIOS),
        help="Scenario to run (repeatable; default: every implemented one).",
    )
    p.add_argument(
        "--runs", type=int, help="Runs per scenario and guarantee (default 3; worker_kill 10)."
    )
    p.add_argument("--guarantee", choices=[*GUARANTEES, "both"], help="Default: both.")
    p.add_argument(
        "--messages", type=int, help=f"agent.message inputs per run (default {DEFAULT_MESSAGES})."
    )
    p.add_argument("--rate", type=float, help="Input rate per second (default: per scenario).")
    p.add_argument("--out", type=Path, help="Report directory (default var/chaos/<timestamp>).")
    p.add_argument(
        "--resume",
        type=Path,
        metavar="DIR",
        help="Continue the run in DIR (its report.json): its options, every run it has not "
        "recorded yet; options given as well must agree with it.",
    )
    p.add_argument(
        "--redo",
        action="append",
        metavar="SCENARIO[:GUARANTEE]",
        help="With --resume: make the recorded runs of SCENARIO (of one guarantee, or both) "
        "again, on the code checked out now, e.g. after a fix. The runs replaced stay in the "
        "report, listed as superseded (repeatable).",
    )
    p.add_argument(
        "--session-timeout",
        type=float,
        help="Workers' AGENTSTREAM_BROKER_SESSION_TIMEOUT_S (default 10; 0 = the setting's "
        "default).",
    )
    p.add_argument(
        "--fault-s",
        type=float,
        help="Length of the network scenarios' fault window (default: 60 s, 30 s for the "
        "blackhole, halved on a short run); forces the full window on a short run.",
    )
    p.add_argument(
        "--kills-per-worker", type=int, help="worker_kill: kills per worker (default 5)."
    )
    p.add_argument(
        "--standby",
        type=int,
        help="AGENTSTREAM_STANDBY_REPLICAS for the workers (default: per scenario; "
        "worker_kill and worker_stop use the product default, 1).",
    )
    p.add_argument(
        "--delivery",
        choices=DELIVERY_PATHS,
        help="The workers' delivery path, their AGENTSTREAM_DELIVERY (default: the runner's "
        "own AGENTSTREAM_DELIVERY, else native). Recorded in the report, so --resume keeps "
        "it (over the runner's AGENTSTREAM_DELIVERY); every run checks its workers' logs "
        "show the path.",
    )
    p.add_argument("--drain-timeout", type=float, help="Default 240 s.")
    p.add_argument("--seed", type=int, help="Seed of the fault moments (default: random).")
    p.add_argument("--keep-topics", action="store_true", default=None)
    p.add_argument("--list", action="store_true", help="List the scenarios and exit.")
    p.add_argument(
        "--plan",
        action="store_true",
        help="Print the runs, load and estimated wall time per scenario (with --resume: "
        "of the runs left) and exit.",
    )
    return p.parse_args(argv)


def _flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def resolve(args: argparse.Namespace) -> argparse.Namespace:
    """`args` with every option set: the explicit ones, then (with --resume) the resumed
    run's, then the defaults. Raises OptionConflict when an explicit option differs from
    the resumed run's."""
    explicit = {k: getattr(args, k) for k in DEFAULTS if getattr(args, k) is not None}
    # the runner's own AGENTSTREAM_DELIVERY picks the path of a new run (below the
    # option, and below the path a resumed report was made on); a value no worker would
    # take is refused, not run as the default
    from_env: dict[str, Any] = {}
    if env_path := os.environ.get(DELIVERY_VAR, ""):
        if env_path not in DELIVERY_PATHS:
            raise OptionConflict(
                f"{DELIVERY_VAR}={env_path!r} is not a delivery path "
                f"({' or '.join(DELIVERY_PATHS)})"
            )
        from_env["delivery"] = env_path
    if explicit.get("scenario"):
        explicit["scenario"] = list(dict.fromkeys(explicit["scenario"]))
    recorded: dict[str, Any] = {}
    previous: list[dict[str, Any]] = []
    doc: dict[str, Any] = {}
    if args.resume is not None:
        doc = load_report(args.resume)
        recorded = recorded_options(doc)
        previous = list(doc.get("runs", []))
        if args.out is not None and args.out.resolve() != args.resume.resolve():
            raise OptionConflict(f"--out {args.out} differs from --resume {args.resume}")
        for key, value in explicit.items():
            if key in recorded and recorded[key] != value:
                raise OptionConflict(
                    f"{_flag(key)} {_show(value)} conflicts with {_show(recorded[key])}, "
                    f"which the run in {args.resume} was started with"
                )
    opts = {**DEFAULTS, **from_env, **recorded, **explicit}
    if not opts["scenario"]:
        opts["scenario"] = [n for n in DEFAULT_ORDER if SCENARIOS[n].implemented]
    out = args.resume or args.out or REPO / "var" / "chaos" / time.strftime("%Y%m%d-%H%M%S")
    superseded: list[dict[str, Any]] = list(doc.get("superseded", []))
    if args.redo:
        if args.resume is None:
            raise OptionConflict("--redo needs --resume: it makes a report's runs again")
        previous, replaced = split_redone(previous, [parse_redo(r) for r in args.redo])
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        superseded += [{**r, "superseded_at": stamp} for r in replaced]
    return argparse.Namespace(
        **opts,
        out=out,
        resume=args.resume,
        previous=previous,
        superseded=superseded,
        list=args.list,
        plan=args.plan,
    )


def parse_redo(text: str) -> tuple[str, str | None]:
    """``SCENARIO`` or ``SCENARIO:GUARANTEE`` of --redo (OptionConflict when unknown)."""
    name, _, guarantee = text.partition(":")
    if name not in SCENARIOS:
        raise OptionConflict(f"--redo {text}: no scenario {name!r}")
    if guarantee and guarantee not in GUARANTEES:
        raise OptionConflict(
            f"--redo {text}: the guarantee is one of {', '.join(GUARANTEES)}, not {guarantee!r}"
        )
    return name, guarantee or None


def split_redone(
    runs: list[dict[str, Any]], redo: list[tuple[str, str | None]]
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(the runs kept, the runs --redo replaces); a --redo that matches no recorded run is
    an OptionConflict (a typo would otherwise redo nothing, silently)."""

    def hit(r: dict[str, Any], name: str, guarantee: str | None) -> bool:
        return r.get("scenario") == name and guarantee in (None, r.get("guarantee"))

    for name, guarantee in redo:
        if not any(hit(r, name, guarantee) for r in runs):
            which = f"{name}:{guarantee}" if guarantee else name
            raise OptionConflict(f"--redo {which}: the report records no such run")
    replaced = [r for r in runs if any(hit(r, n, g) for n, g in redo)]
    kept = [r for r in runs if not any(hit(r, n, g) for n, g in redo)]
    return kept, replaced


def _show(value: Any) -> str:
    if isinstance(value, list):
        return ",".join(str(v) for v in value)
    return str(value)


def load_report(out: Path) -> dict[str, Any]:
    path = out / "report.json"
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise OptionConflict(f"--resume {out}: no report.json there") from None
    except ValueError as exc:
        raise OptionConflict(f"--resume {out}: report.json is not JSON ({exc})") from None
    if not isinstance(doc, dict):
        raise OptionConflict(f"--resume {out}: report.json is not a chaos report")
    return doc


def recorded_options(doc: dict[str, Any]) -> dict[str, Any]:
    """The options a report was made with: meta.options, or for a report written before
    they were recorded, what its meta and runs show (the inputs per run, the session
    timeout, the scenarios and guarantees of its runs)."""
    meta = doc.get("meta", {})
    if "options" in meta:
        # a report from before the option was made on the per-record path
        return {"delivery": "per-record", **meta["options"]}
    found: dict[str, Any] = {"delivery": "per-record"}  # the only path there was
    if "messages" in meta:
        found["messages"] = meta["messages"]
    if "session_timeout_s" in meta:
        found["session_timeout"] = meta["session_timeout_s"]
    return found


def run_key(r: dict[str, Any]) -> tuple[str, str, int]:
    """(scenario, guarantee, run number) of a recorded run (older reports: from its
    directory, <out>/<scenario>/<guarantee>/run<n>)."""
    number = r.get("run")
    if number is None:
        number = int(Path(str(r.get("dir", "run0"))).name.removeprefix("run") or 0)
    return (r["scenario"], r["guarantee"], int(number))


def scheduled(args: argparse.Namespace) -> list[tuple[Scenario, str, int]]:
    """Every (scenario, guarantee, run number) of the options, in running order."""
    guarantees = list(GUARANTEES) if args.guarantee == "both" else [args.guarantee]
    out = []
    for name in args.scenario:
        sc = SCENARIOS[name]
        if not sc.implemented:
            continue
        for guarantee in guarantees:
            out += [(sc, guarantee, i + 1) for i in range(args.runs or sc.runs)]
    return out


def remaining(args: argparse.Namespace) -> list[tuple[Scenario, str, int]]:
    """The scheduled runs the report does not record yet."""
    recorded = {run_key(r) for r in args.previous}
    return [(sc, g, n) for sc, g, n in scheduled(args) if (sc.name, g, n) not in recorded]


def options_record(args: argparse.Namespace) -> dict[str, Any]:
    return {k: getattr(args, k) for k in DEFAULTS}


def code_version(repo: Path = REPO) -> dict[str, Any]:
    """The commit of the code that runs and whether its tree differs from it."""

    def git(*cmd: str) -> str:
        return subprocess.run(
            ["git", "-C", str(repo), *cmd], capture_output=True, text=True, timeout=30
        ).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD") or None
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        commit, dirty = None, False
    return {"commit": commit, "dirty": dirty}


def list_scenarios() -> str:
    out = []
    for s in SCENARIOS.values():
        state = "ready" if s.implemented else f"hook — needs {s.needs}"
        out.append(f"{s.name} ({state}, {s.rate:.0f} inputs/s)\n    " + " ".join(s.doc.split()))
    return "\n".join(out)


def plan_text(args: argparse.Namespace) -> str:
    guarantees = 2 if args.guarantee == "both" else 1
    left = remaining(args)
    done: dict[str, int] = {}
    for sc, guarantee, number in scheduled(args):
        if (sc, guarantee, number) not in left:
            done[sc.name] = done.get(sc.name, 0) + 1
    names = [n for n in args.scenario if SCENARIOS[n].implemented]
    rows = plan.plan(
        [(n, args.rate or SCENARIOS[n].rate, args.runs or SCENARIOS[n].runs) for n in names],
        guarantees,
        args.messages,
        fixed=plan.measured_overheads(sorted((REPO / "var" / "chaos").glob("*/report.json"))),
        done=done,
    )
    head = f"runs left in {args.out}: " if args.resume else ""
    return head + plan.render(rows, args.messages, guarantees)


async def main_async(args: argparse.Namespace) -> int:
    names = args.scenario
    skipped = {n: s.needs or "" for n, s in SCENARIOS.items() if not s.implemented}
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    recorded = {run_key(r) for r in args.previous}
    todo = remaining(args)
    if args.resume is not None:
        print(f"resuming {out}: {len(recorded)} run(s) recorded, {len(todo)} to make", flush=True)
    external = os.environ.get("AGENTSTREAM_KAFKA_BOOTSTRAP", "").strip() or None
    shared: OwnBroker | None = None
    bootstrap = external
    version = code_version()
    meta: dict[str, Any] = {
        "broker": external or "chaos broker / per scenario",
        "session_timeout_s": args.session_timeout or DEFAULT_SESSION_TIMEOUT_S,
        "messages": args.messages,
        "options": options_record(args),
    }
    runs: list[dict[str, Any]] = list(args.previous)
    write(
        out, runs, skipped, meta, superseded=args.superseded
    )  # the options are on record before the first run
    for name in names:
        if not SCENARIOS[name].implemented:
            print(f"{name}: skipped — needs {SCENARIOS[name].needs}", flush=True)
    try:
        if bootstrap is None and any(not sc.own_broker for sc, _, _ in todo):
            shared = OwnBroker(REPO / "var" / "chaos-kafka", PORT_BASE)
            print(f"starting the chaos broker on {shared.bootstrap} …", flush=True)
            bootstrap = await _start(shared)
        for sc, guarantee, number in todo:
            result = await _one(args, sc, guarantee, number, out, bootstrap, shared)
            result.update(run=number, **version)
            runs.append({k: v for k, v in result.items() if k != "events"})
            _print_run(result)
            write(out, runs, skipped, meta, superseded=args.superseded)
    except asyncio.CancelledError:
        print(
            f"interrupted: {len(runs)} run(s) recorded in {out / 'report.json'}; "
            f"the rest with: python -m tests.chaos --resume {out}",
            flush=True,
        )
        return INTERRUPTED
    finally:
        if shared is not None:
            await uninterrupted(asyncio.to_thread(shared.stop))
    write(out, runs, skipped, meta, superseded=args.superseded)
    print((out / "report.md").read_text())
    print(f"report: {out / 'report.json'}, {out / 'report.md'}")
    failed = sum(1 for r in runs if not r.get("ok"))
    return 1 if failed else 0


#: exit code of an interrupted run (as a shell reports SIGINT)
INTERRUPTED = 130


async def _start(broker: OwnBroker | OwnKafka) -> str:
    """Start `broker` in a thread; interrupted meanwhile, let the start finish and stop
    it (a thread cannot be cancelled: it would start the broker after the stop)."""
    try:
        return await uninterrupted(asyncio.to_thread(broker.start))
    except BaseException:
        await uninterrupted(asyncio.to_thread(broker.stop, True))
        raise


async def _one(
    args: argparse.Namespace,
    sc: Scenario,
    guarantee: str,
    number: int,
    out: Path,
    bootstrap: str | None,
    shared: OwnBroker | None,
) -> dict[str, Any]:
    assert sc.func is not None
    run_dir = out / sc.name / guarantee / f"run{number}"
    if run_dir.exists():
        # what an interrupted attempt left: its processes, and logs a new worker would
        # be judged by (Ready is read from the log)
        await asyncio.to_thread(sweep, run_dir)
        await asyncio.to_thread(shutil.rmtree, run_dir, True)
    own: OwnBroker | OwnKafka | None = None
    broker: OwnBroker | OwnKafka | None = shared
    extra_env = {"CHAOS_KILLS_PER_WORKER": str(args.kills_per_worker)}
    if args.fault_s:
        extra_env["CHAOS_FAULT_S"] = str(args.fault_s)
    broker_start_s = 0.0
    if sc.own_broker:  # a broker to kill: never the shared or an external one
        if sc.kafka == "broker":
            own = OwnBroker(run_dir / "kafka", PORT_BASE + 20)
        else:  # "proxied": one broker behind Toxiproxy; "cluster": 3 nodes
            proxied = sc.kafka == "proxied"
            own = OwnKafka(run_dir / "kafka", nodes=1 if proxied else 3, proxied=proxied)
            extra_env.update(own.worker_env())
        print(f"{sc.name}: starting its own {sc.kafka} on {own.bootstrap} …", flush=True)
        t0 = time.monotonic()
        bootstrap = await _start(own)
        broker_start_s = time.monotonic() - t0
        broker = own
    assert bootstrap is not None
    opts = RunOptions(
        scenario=sc.name,
        guarantee=guarantee,
        messages=args.messages,
        out_dir=run_dir,
        bootstrap=bootstrap,
        workers=sc.workers,
        partitions=sc.partitions,
        rate=args.rate or sc.rate,
        poison_ratio=sc.poison_ratio,
        standby_replicas=sc.standby_replicas if args.standby is None else args.standby,
        session_timeout_s=args.session_timeout or None,
        drain_timeout_s=args.drain_timeout,
        seed=None if args.seed is None else args.seed + number - 1,
        keep_topics=args.keep_topics or own is not None,
        broker=broker if (own is not None) else None,
        extra_env=extra_env,
        delivery=args.delivery,
        verbose=True,
    )
    print(f"{sc.name} / {guarantee} / run {number}: {args.messages} messages …", flush=True)
    try:
        result = await run_once(opts, sc.func)
        result["broker_start_s"] = round(broker_start_s, 1)
        return result
    finally:
        if own is not None:
            await uninterrupted(asyncio.to_thread(own.stop, True))


def _print_run(r: dict[str, Any]) -> None:
    c = r.get("check", {})
    state = "ok" if r.get("ok") else "FAILED"
    print(
        f"  -> {state}: lost {c.get('lost')}, duplicates {c.get('duplicates')}"
        f"/{c.get('decision_duplicates')}, order violations {c.get('order_violations')}, "
        f"resume {r.get('resume_after_kill_s')}, drain {r.get('drain_s')} s, "
        f"cpu {r.get('cpu_s')} s, wall {r.get('wall_s')} s",
        flush=True,
    )
    for f in r.get("failures", []):
        print(f"     {f}", flush=True)
    if r.get("error"):
        print(f"     error: {r['error']}", flush=True)


def main(argv: list[str] | None = None) -> int:
    try:
        args = resolve(parse_args(argv))
    except OptionConflict as exc:
        print(f"python -m tests.chaos: {exc}", file=sys.stderr)
        return USAGE_ERROR
    # aiokafka logs every retried produce (e.g. right after a topic is created)
    logging.getLogger("aiokafka").setLevel(logging.ERROR)
    if args.list:
        print(list_scenarios())
        return 0
    if args.plan:
        print(plan_text(args))
        return 0
    try:
        return asyncio.run(_interruptible(main_async(args)))
    finally:
        # a broker (re)started in a thread while the run was interrupted may have come
        # up after its stop: nothing of this run may outlive it
        for name in args.scenario:
            sweep(args.out / name)


async def _interruptible(main: Coroutine[Any, Any, int]) -> int:
    """Run `main`; the first SIGINT or SIGTERM cancels it, so every run's finally blocks
    stop their workers and brokers and nothing half-done is recorded; later ones say
    that it is stopping and cancel it again."""
    task = asyncio.ensure_future(main)
    loop = asyncio.get_running_loop()
    stopping: list[int] = []

    def interrupt(sig: int) -> None:
        if stopping:
            # cancelled again: a cancellation lost on its way (see `collect.stop_task`)
            # left a runner that ignored every later signal; the workers and brokers
            # are stopped under `uninterrupted`, which a second cancellation does not cut
            print("still stopping the run's workers and brokers …", flush=True)
            task.cancel()
            return
        stopping.append(sig)
        print(f"\n{signal.Signals(sig).name}: stopping the run in progress …", flush=True)
        task.cancel()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, interrupt, sig)
    try:
        return await task
    except asyncio.CancelledError:
        return INTERRUPTED
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


if __name__ == "__main__":
    sys.exit(main())
