"""The Quix Streams peer of the peers stage: the pipeline passthrough's work written the
way a Quix Streams user writes it.

    sdf = app.dataframe(input).apply(work); sdf.to_topic(output); app.run()

`work` is `encode(registry.decode(value))` (`bench.peers_common`); values (and keys) go
through Quix's ``bytes`` serializers, so the decode and encode are this project's, as in
the pipeline. Everything else is Quix's default (at-least-once, its confluent-kafka
consumer and producer settings, a commit every 5 s), except reading the input from the
beginning, the consumer group (fresh per run) and the state directory
(``BENCH_PEER_STATE_DIR``, under the run's work dir). It runs until stopped; the harness
times it by the output topic's end offsets, as it times the pipeline.

Run as ``python -m bench.peer_quix`` with the python of the peers' virtualenv
(`bench.peers_venv`) under the environment described in `bench.peers_common`.
"""

from __future__ import annotations

import os

from bench.peers_common import peer_env, work


def main() -> None:
    from quixstreams import Application

    bootstrap, group, source, sink, _events = peer_env()
    app = Application(
        broker_address=bootstrap,
        consumer_group=group,
        auto_offset_reset="earliest",
        state_dir=os.environ["BENCH_PEER_STATE_DIR"],
        loglevel="INFO",
    )
    inp = app.topic(source, key_deserializer="bytes", value_deserializer="bytes")
    out = app.topic(sink, key_serializer="bytes", value_serializer="bytes")
    sdf = app.dataframe(inp)
    sdf = sdf.apply(work)
    sdf.to_topic(out)
    app.run()


if __name__ == "__main__":
    main()
