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
"""

from __future__ import annotations

from bench.context import BenchContext, Worker, log
from bench.peers_common import peer_bootstrap

NAME = "peers"

#: Generous upper bound for one runner; a stalled runner must not hang the run.
STAGE_TIMEOUT_S = 600.0

#: key → (runner module, output topic)
RUNNERS = {
    "quix_eps": ("bench.peer_quix", "bench.quix.out"),
    "samework_ceiling_eps": ("bench.peer_samework", "bench.samework.out"),
}


async def run(ctx: BenchContext) -> dict[str, float]:
    peer_bootstrap(ctx.settings)  # a secured cluster: fail before starting anything
    env = ctx.new_env()
    source = ctx.topic(env, "agent.messages")
    await ctx.create_topic(source)
    values, keys = ctx.payloads()
    log(f"peers: producing {len(values)} events of ~{len(values[0])} B to {source}")
    await ctx.produce(source, values, keys)
    n = len(values)
    out: dict[str, float] = {}
    for key, (module, sink_name) in RUNNERS.items():
        sink = ctx.topic(env, sink_name)
        await ctx.create_topic(sink)
        runner_env = ctx.new_env(
            BENCH_PEER_IN=source,
            BENCH_PEER_OUT=sink,
            BENCH_PEER_EVENTS=str(n),
        )
        runner_env["BENCH_PEER_STATE_DIR"] = f"{runner_env['AGENTSTREAM_DATA_DIR']}/state"
        worker = ctx.start_process(runner_env, "-m", module)
        out[key] = await _timed(ctx, worker, sink, n)
        log(f"peers: {key} {out[key]:,.0f} ev/s")
    return out


async def _timed(ctx: BenchContext, worker: Worker, topic: str, n: int) -> float:
    try:
        measured = await ctx.watch_count(topic, n, STAGE_TIMEOUT_S, worker=worker)
        return measured.eps
    finally:
        worker.stop()
