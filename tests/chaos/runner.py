"""`python -m tests.chaos`: run scenarios K times under one or both guarantees against a
real broker with real workers, then write report.json and report.md."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from tests.chaos.cluster import PORT_BASE, OwnBroker, OwnKafka
from tests.chaos.harness import DEFAULT_SESSION_TIMEOUT_S, GUARANTEES, RunOptions, run_once
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


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
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
    p.add_argument("--guarantee", choices=[*GUARANTEES, "both"], default="both")
    p.add_argument(
        "--messages",
        type=int,
        default=DEFAULT_MESSAGES,
        help="agent.message inputs per run (default 100000).",
    )
    p.add_argument("--rate", type=float, help="Input rate per second (default: per scenario).")
    p.add_argument(
        "--out", type=Path, default=REPO / "var" / "chaos" / time.strftime("%Y%m%d-%H%M%S")
    )
    p.add_argument(
        "--session-timeout",
        type=float,
        default=10.0,
        help="Workers' AGENTSTREAM_BROKER_SESSION_TIMEOUT_S (default 10; 0 = the setting's "
        "default).",
    )
    p.add_argument(
        "--fault-s",
        type=float,
        help="Length of the network scenarios' fault window (default: 60 s, 30 s for the "
        "blackhole, halved on a short run); forces the full window on a short run.",
    )
    p.add_argument("--kills-per-worker", type=int, default=5, help="worker_kill: kills per worker.")
    p.add_argument(
        "--standby",
        type=int,
        help="AGENTSTREAM_STANDBY_REPLICAS for the workers (default: per scenario; "
        "worker_kill and worker_stop use the product default, 1).",
    )
    p.add_argument("--drain-timeout", type=float, default=240.0)
    p.add_argument("--seed", type=int, help="Seed of the fault moments (default: random).")
    p.add_argument("--keep-topics", action="store_true")
    p.add_argument("--list", action="store_true", help="List the scenarios and exit.")
    return p.parse_args(argv)


def list_scenarios() -> str:
    out = []
    for s in SCENARIOS.values():
        state = "ready" if s.implemented else f"hook — needs {s.needs}"
        out.append(f"{s.name} ({state})\n    " + " ".join(s.doc.split()))
    return "\n".join(out)


async def main_async(args: argparse.Namespace) -> int:
    names = args.scenario or [n for n in DEFAULT_ORDER if SCENARIOS[n].implemented]
    guarantees = list(GUARANTEES) if args.guarantee == "both" else [args.guarantee]
    skipped = {n: s.needs or "" for n, s in SCENARIOS.items() if not s.implemented}
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    external = os.environ.get("AGENTSTREAM_KAFKA_BOOTSTRAP", "").strip() or None
    shared: OwnBroker | None = None
    bootstrap = external
    if bootstrap is None and any(not SCENARIOS[n].own_broker for n in names):
        shared = OwnBroker(REPO / "var" / "chaos-kafka", PORT_BASE)
        print(f"starting the chaos broker on {shared.bootstrap} …", flush=True)
        bootstrap = await asyncio.to_thread(shared.start)
    meta: dict[str, Any] = {
        "broker": external or (shared.bootstrap if shared else "per scenario"),
        "session_timeout_s": args.session_timeout or DEFAULT_SESSION_TIMEOUT_S,
        "messages": args.messages,
    }
    runs: list[dict[str, Any]] = []
    failed = 0
    try:
        for name in names:
            sc = SCENARIOS[name]
            if not sc.implemented:
                print(f"{name}: skipped — needs {sc.needs}", flush=True)
                continue
            k = args.runs or sc.runs
            for guarantee in guarantees:
                for i in range(k):
                    result = await _one(args, sc, guarantee, i, out, bootstrap, shared)
                    runs.append(result)
                    failed += 0 if result.get("ok") else 1
                    _print_run(result)
                    write(out, runs, skipped, meta)
    finally:
        if shared is not None:
            await asyncio.to_thread(shared.stop)
    summary = write(out, runs, skipped, meta)
    print((out / "report.md").read_text())
    print(f"report: {out / 'report.json'}, {out / 'report.md'}")
    del summary
    return 1 if failed else 0


async def _one(
    args: argparse.Namespace,
    sc: Scenario,
    guarantee: str,
    i: int,
    out: Path,
    bootstrap: str | None,
    shared: OwnBroker | None,
) -> dict[str, Any]:
    assert sc.func is not None
    run_dir = out / sc.name / guarantee / f"run{i + 1}"
    own: OwnBroker | OwnKafka | None = None
    broker: OwnBroker | OwnKafka | None = shared
    extra_env = {"CHAOS_KILLS_PER_WORKER": str(args.kills_per_worker)}
    if args.fault_s:
        extra_env["CHAOS_FAULT_S"] = str(args.fault_s)
    if sc.own_broker:  # a broker to kill: never the shared or an external one
        if sc.kafka == "broker":
            own = OwnBroker(run_dir / "kafka", PORT_BASE + 20)
        else:  # "proxied": one broker behind Toxiproxy; "cluster": 3 nodes
            proxied = sc.kafka == "proxied"
            own = OwnKafka(run_dir / "kafka", nodes=1 if proxied else 3, proxied=proxied)
            extra_env.update(own.worker_env())
        print(f"{sc.name}: starting its own {sc.kafka} on {own.bootstrap} …", flush=True)
        try:
            bootstrap = await asyncio.to_thread(own.start)
        except BaseException:
            await asyncio.to_thread(own.stop, True)
            raise
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
        seed=None if args.seed is None else args.seed + i,
        keep_topics=args.keep_topics or own is not None,
        broker=broker if (own is not None) else None,
        extra_env=extra_env,
        verbose=True,
    )
    print(f"{sc.name} / {guarantee} / run {i + 1}: {args.messages} messages …", flush=True)
    try:
        return await run_once(opts, sc.func)
    finally:
        if own is not None:
            await asyncio.to_thread(own.stop, True)


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
    args = parse_args(argv)
    # aiokafka logs every retried produce (e.g. right after a topic is created)
    logging.getLogger("aiokafka").setLevel(logging.ERROR)
    if args.list:
        print(list_scenarios())
        return 0
    return asyncio.run(main_async(args))


if __name__ == "__main__":
    sys.exit(main())
