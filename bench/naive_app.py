"""Stage (b) of the core benchmark: the Faust agent a typical Faust user writes — one
event at a time, Faust's default JSON value codec, one awaited `send` per event.

Run as ``python -m bench.naive_app worker``; configured by the environment the harness
builds (``AGENTSTREAM_KAFKA_BOOTSTRAP``, ``AGENTSTREAM_APP_ID``,
``AGENTSTREAM_WEB_PORT``, ``AGENTSTREAM_DATA_DIR``) plus ``BENCH_NAIVE_IN`` /
``BENCH_NAIVE_OUT`` (full topic names). Only settings needed to run side by side with
other workers are changed; everything else is Faust's default.
"""

from __future__ import annotations

import os
from typing import Any

import faust

app = faust.App(
    os.environ.get("AGENTSTREAM_APP_ID", "bench-naive"),
    broker=f"kafka://{os.environ.get('AGENTSTREAM_KAFKA_BOOTSTRAP', '127.0.0.1:19092')}",
    store="memory://",
    datadir=os.environ.get("AGENTSTREAM_DATA_DIR", "var/bench/naive"),
    web_port=int(os.environ.get("AGENTSTREAM_WEB_PORT", "6067")),
    web_host="127.0.0.1",
    web_bind="127.0.0.1",
    consumer_auto_offset_reset="earliest",
)

source = app.topic(os.environ.get("BENCH_NAIVE_IN", "agent.messages"))
sink = app.topic(os.environ.get("BENCH_NAIVE_OUT", "bench.naive.out"))


@app.agent(source)
async def forward(stream: Any) -> None:
    async for event in stream:
        await sink.send(value=event)


if __name__ == "__main__":
    app.main()
