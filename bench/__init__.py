"""The benchmark harness: `python -m bench` measures events/s of the pipeline against a
naive Faust agent and the raw-aiokafka ceiling on the same broker (see docs/bench.md).

Stages live in `bench/stage_<name>.py`, each with `NAME: str` and
`async def run(ctx: BenchContext) -> dict[str, float]`; `core` runs first.
"""
