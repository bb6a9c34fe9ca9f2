"""The peers stage: the pipeline passthrough's work done by the alternatives a user would
weigh it against, on the same broker and the same input as the core stage.

The work per event is `encode(registry.decode(value))` — decode and validate with this
project's schemas, re-encode — then produce to an output topic (`bench.peers_common.work`).
The run's `N` events (`BenchContext.payloads`, the core stage's data, keyed and
partitioned the same way) are written to a fresh `agent.messages` topic; then, one after
the other, each runner reads it from the beginning with its own consumer group and writes
every event to its own output topic:

* ``quix_eps``: Quix Streams, ``sdf.apply(work)`` → ``to_topic`` (`bench.peer_quix`);
* ``samework_ceiling_eps``: a plain confluent-kafka consume → work → produce loop
  (`bench.peer_samework`): what the same work costs with nothing in the way.

Each runs in its own subprocess and is timed exactly like the core stage's
``pipeline_eps``: from the first poll of the output topic's end offsets that sees output
to the first that sees N records (start-up, group join and the first fetch excluded).
The ratios to the pipeline and the policy stage (``pipeline_vs_quix``,
``pipeline_vs_samework``, ``policy_vs_quix``) are computed by `bench.__main__.ratios`
when those stages ran in the same invocation.

The runners run with the python of the peers' own virtualenv (`bench.peers_venv`, built on
first use), whose pydantic is the one Quix Streams allows rather than the project's. So
before measuring, `bench.peers_probe` runs there on the first events: its re-encoded
events must equal the pipeline environment's byte for byte, and the work's cost per event
in both environments is reported (``peers_env_work_us``, ``pipeline_env_work_us``).
"""

from __future__ import annotations

import asyncio
import json
import subprocess
from pathlib import Path

from bench import peers_venv
from bench.context import (
    REPO,
    BenchContext,
    BenchError,
    Throughput,
    Worker,
    cpu_keys,
    cpu_text,
    log,
)
from bench.peers_common import peer_bootstrap, work, work_us

NAME = "peers"

#: Generous upper bound for one runner; a stalled runner must not hang the run.
STAGE_TIMEOUT_S = 600.0

#: events the probe re-encodes in both environments (and times the work on)
PROBE_EVENTS = 5_000

#: key → (runner module, output topic)
RUNNERS = {
    "quix_eps": ("bench.peer_quix", "bench.quix.out"),
    "samework_ceiling_eps": ("bench.peer_samework", "bench.samework.out"),
}


async def run(ctx: BenchContext) -> dict[str, float]:
    peer_bootstrap(ctx.settings)  # a secured cluster: fail before starting anything
    try:
        python = await asyncio.to_thread(peers_venv.ensure, None, log)
    except peers_venv.PeersVenvError as exc:
        raise BenchError(f"no virtualenv for the peers: {exc}") from exc
    values, keys = ctx.payloads()
    out = await asyncio.to_thread(check_work, ctx, python, values[:PROBE_EVENTS])
    env = ctx.new_env()
    source = ctx.topic(env, "agent.messages")
    await ctx.create_topic(source)
    log(f"peers: producing {len(values)} events of ~{len(values[0])} B to {source}")
    await ctx.produce(source, values, keys)
    n = len(values)
    for key, (module, sink_name) in RUNNERS.items():
        sink = ctx.topic(env, sink_name)
        await ctx.create_topic(sink)
        runner_env = ctx.new_env(
            BENCH_PEER_IN=source,
            BENCH_PEER_OUT=sink,
            BENCH_PEER_EVENTS=str(n),
        )
        runner_env["BENCH_PEER_STATE_DIR"] = f"{runner_env['AGENTSTREAM_DATA_DIR']}/state"
        worker = ctx.start_process(runner_env, "-m", module, python=python)
        measured = await _timed(ctx, worker, sink, n)
        out[key] = measured.eps
        out.update(cpu_keys(key.removesuffix("_eps"), measured))
        log(f"peers: {key} {out[key]:,.0f} ev/s{cpu_text(measured)}")
    return out


def check_work(ctx: BenchContext, python: Path, values: list[bytes]) -> dict[str, float]:
    """Run `bench.peers_probe` with the peers' python: it must import this checkout's
    schemas and re-encode values exactly as this (the pipeline's) environment does.
    Returns the work's cost per event in both environments."""
    done = subprocess.run(
        [str(python), "-m", "bench.peers_probe"],
        input=json.dumps([v.decode() for v in values]),
        capture_output=True,
        text=True,
        cwd=REPO,
        env=ctx.new_env(),
        timeout=120,
        check=False,
    )
    if done.returncode != 0:
        raise BenchError(f"bench.peers_probe failed in {python}:\n{done.stderr[-3000:]}")
    probe = json.loads(done.stdout)
    if not Path(probe["agentstream"]).resolve().is_relative_to(REPO):
        raise BenchError(f"the peers import agentstream from {probe['agentstream']}, not {REPO}")
    ours = [work(v).decode() for v in values]
    differ = [i for i, (a, b) in enumerate(zip(ours, probe["outputs"], strict=True)) if a != b]
    if differ:
        raise BenchError(
            f"the peers' environment ({probe['versions']}) re-encodes {len(differ)} of "
            f"{len(values)} events differently from the pipeline's, e.g. event {differ[0]}:\n"
            f"{ours[differ[0]]}\n{probe['outputs'][differ[0]]}"
        )
    here = work_us(values)
    versions = ", ".join(f"{k} {v}" for k, v in probe["versions"].items())
    log(
        f"peers: {python} ({versions}); same output on {len(values)} events; work "
        f"{probe['work_us']:.1f} µs/event there, {here:.1f} µs/event in the pipeline's env"
    )
    return {"peers_env_work_us": probe["work_us"], "pipeline_env_work_us": here}


async def _timed(ctx: BenchContext, worker: Worker, topic: str, n: int) -> Throughput:
    try:
        return await ctx.watch_count(topic, n, STAGE_TIMEOUT_S, worker=worker)
    finally:
        worker.stop()
