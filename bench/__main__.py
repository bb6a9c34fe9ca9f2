"""`python -m bench`: run every benchmark stage against one broker and print the results
as one JSON object on the last line of stdout (progress goes to stderr)."""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import os
import pkgutil
import sys
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

from agentstream.streams.settings import delivery_path
from bench.context import BenchContext, log

#: Rates that are references, not stages to compare against the naive agent.
REFERENCE_KEYS = frozenset(
    {
        "naive_faust_eps",
        "ceiling_eps",
        "raw_consume_eps",
        "produce_eps",
        "quix_eps",
        "samework_ceiling_eps",
    }
)

#: ratio key → (numerator, denominator): our stages against the peers stage's runners
PEER_RATIOS = {
    "pipeline_vs_quix": ("pipeline_eps", "quix_eps"),
    "pipeline_vs_samework": ("pipeline_eps", "samework_ceiling_eps"),
    "policy_vs_quix": ("policy_eps", "quix_eps"),
}


def discover() -> dict[str, ModuleType]:
    """Every `bench/stage_*.py` module by its NAME, `core` first."""
    found: dict[str, ModuleType] = {}
    for info in pkgutil.iter_modules([str(Path(__file__).parent)]):
        if not info.name.startswith("stage_"):
            continue
        module = importlib.import_module(f"bench.{info.name}")
        found[getattr(module, "NAME", info.name[len("stage_") :])] = module
    return dict(sorted(found.items(), key=lambda kv: (kv[0] != "core", kv[0])))


def ratios(results: dict[str, float | str]) -> dict[str, float]:
    """`<x>_vs_naive` for every measured `<x>_eps`, `pipeline_vs_ceiling`, the
    `PEER_RATIOS` whose two rates were both measured (in this run), and the soak's
    `rss_growth`."""
    rates = {k: v for k, v in results.items() if k.endswith("_eps") and isinstance(v, int | float)}
    out: dict[str, float] = {}
    naive = rates.get("naive_faust_eps")
    if naive:
        for key, value in rates.items():
            if key not in REFERENCE_KEYS:
                out[f"{key[: -len('_eps')]}_vs_naive"] = round(value / naive, 3)
    ceiling = rates.get("ceiling_eps")
    if ceiling and "pipeline_eps" in rates:
        out["pipeline_vs_ceiling"] = round(rates["pipeline_eps"] / ceiling, 3)
    for key, (ours, peer) in PEER_RATIOS.items():
        if rates.get(ours) and rates.get(peer):
            out[key] = round(rates[ours] / rates[peer], 3)
    start, end = results.get("rss_start_mb"), results.get("rss_end_mb")
    if isinstance(start, int | float) and isinstance(end, int | float) and start > 0:
        # the soak stage's memory goal: within ±10 % over the run
        out["rss_growth"] = round(end / start, 3)
    return out


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    p.add_argument("--events", type=int, default=200_000, help="events per measurement")
    p.add_argument("--payload-bytes", type=int, default=300, help="approximate event size")
    p.add_argument("--partitions", type=int, default=4, help="partitions of the bench topics")
    p.add_argument("--stages", default="", help="comma-separated stage names (default: all found)")
    p.add_argument("--out", type=Path, default=None, help="also write the JSON to this file")
    p.add_argument(
        "--guarantee",
        choices=("at_least_once", "exactly_once"),
        default="at_least_once",
        help="the workers' AGENTSTREAM_PROCESSING_GUARANTEE (the peers run at-least-once)",
    )
    args = p.parse_args(argv)
    if args.events < 1 or args.payload_bytes < 1 or args.partitions < 1:
        p.error("--events, --payload-bytes and --partitions must be positive")
    return args


def start_broker() -> str:
    from agentstream.infra.kafka import launcher

    external = launcher.external_bootstrap()
    if external:
        log(f"using the cluster at {external} (AGENTSTREAM_KAFKA_BOOTSTRAP)")
        return external
    log("starting the local broker (agentstream kafka start)")
    return launcher.start(launcher.BrokerConfig.from_env())


async def run_stages(ctx: BenchContext, stages: dict[str, ModuleType]) -> None:
    for name, module in stages.items():
        log(f"stage {name}: start")
        t0 = time.monotonic()
        try:
            got: dict[str, Any] = await module.run(ctx)
            ctx.results.update(got)
        except Exception as exc:  # one broken stage must not cost the others' numbers
            traceback.print_exc(file=sys.stderr)
            ctx.results[f"{name}_error"] = f"{type(exc).__name__}: {exc}"[:2000]
        log(f"stage {name}: done in {time.monotonic() - t0:.1f}s")


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    try:
        bootstrap = start_broker()
    except Exception as exc:  # still end with the promised JSON line
        traceback.print_exc(file=sys.stderr)
        return {"harness_error": f"no broker: {type(exc).__name__}: {exc}"[:2000]}
    stages = discover()
    if args.stages:
        wanted = [s.strip() for s in args.stages.split(",") if s.strip()]
        unknown = [s for s in wanted if s not in stages]
        if unknown:
            raise SystemExit(f"unknown stage(s) {unknown}; found {sorted(stages)}")
        stages = {k: v for k, v in stages.items() if k in wanted}
    ctx = BenchContext(
        bootstrap, args.events, args.payload_bytes, args.partitions, guarantee=args.guarantee
    )
    # the workers' delivery path: their AGENTSTREAM_DELIVERY is the bench's own
    delivery = delivery_path(os.environ)
    log(
        f"stages {list(stages)}; {args.events} events of ~{args.payload_bytes} B, "
        f"{args.partitions} partitions, {args.guarantee}, {delivery} delivery; "
        f"logs in {ctx.work_dir}"
    )
    try:
        await run_stages(ctx, stages)
    finally:
        await ctx.close()
    result: dict[str, Any] = {
        "events": args.events,
        "payload_bytes": args.payload_bytes,
        "partitions": args.partitions,
        "guarantee": args.guarantee,
        "delivery": delivery,
    }
    for key, value in ctx.results.items():
        result[key] = rounded(key, value)
    result.update(ratios(ctx.results))
    return result


def rounded(key: str, value: Any) -> Any:
    """A result as the JSON reports it: rates and times to 0.1, a busy share (a
    fraction of one CPU) to 0.01."""
    if not isinstance(value, float):
        return value
    return round(value, 2 if key.endswith("_busy") else 1)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    # the harness runs on the loop the LLM stage's worker runs on (uvloop), so that the
    # direct httpx baseline is measured on equal terms; BENCH_EVENT_LOOP=asyncio for both
    loop_name = os.environ.get("BENCH_EVENT_LOOP", "uvloop")
    if loop_name == "uvloop":
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    result = asyncio.run(main_async(args))
    line = json.dumps(result, sort_keys=False)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(line + "\n")
    print(line, flush=True)
    return 1 if any(k.endswith("_error") for k in result) else 0


if __name__ == "__main__":
    sys.exit(main())
