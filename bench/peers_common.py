"""What the peer runners of the peers stage share: the work they do on every event, and
how they find (and refuse) the broker.

The peers are Quix Streams (`bench.peer_quix`) and a plain confluent-kafka loop
(`bench.peer_samework`). Both run as subprocesses with the python of the peers' own
virtualenv (`bench.peers_venv`; this module is imported in both environments) under an
environment built by `BenchContext.new_env` plus ``BENCH_PEER_IN`` / ``BENCH_PEER_OUT``
(full topic names) and ``BENCH_PEER_EVENTS`` (how many input records there are). Their
consumer group is the environment's ``AGENTSTREAM_APP_ID``, fresh for every runner.

They are built on client libraries other than aiokafka, so `streams.kafka_security`
cannot build their clients. Rather than translate the TLS/SASL settings into librdkafka's
options (and measure a peer on a connection the pipeline does not use), a peer connects
only to a plaintext cluster: `peer_bootstrap` raises `PeerSecurityError` when the settings
ask for TLS or SASL, so a peer never connects in plaintext to a cluster that is meant to
be secured.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence

from agentstream.schemas import encode, registry
from agentstream.streams.settings import Settings


class PeerSecurityError(RuntimeError):
    """The settings ask for TLS or SASL, which the peer runners do not speak."""


def work(value: bytes) -> bytes:
    """The same work per event as the pipeline's passthrough: decode and validate with this
    project's schemas (size limit, orjson, upcasting, pydantic), then re-encode."""
    return encode(registry.decode(value))


def work_us(values: Sequence[bytes], rounds: int = 5) -> float:
    """Microseconds of `work` per event over values, the best of a few rounds (the least
    disturbed by other processes on the machine)."""
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        for value in values:
            work(value)
        best = min(best, time.perf_counter() - t0)
    return best / len(values) * 1e6


def peer_bootstrap(settings: Settings) -> str:
    """The bootstrap address a peer connects to; refuses a secured cluster."""
    protocol = settings.kafka_security_protocol
    if protocol != "PLAINTEXT":
        raise PeerSecurityError(
            f"AGENTSTREAM_KAFKA_SECURITY_PROTOCOL={protocol}: the peers stage's runners "
            "(Quix Streams, confluent-kafka) connect in plaintext only and are not built by "
            "streams.kafka_security; run `--stages` without `peers` against a secured "
            "cluster, or bench the peers on a plaintext one"
        )
    return settings.bootstrap


def peer_env(environ: Mapping[str, str] | None = None) -> tuple[str, str, str, str, int]:
    """(bootstrap, group, input topic, output topic, events) of a peer subprocess."""
    env = os.environ if environ is None else environ
    bootstrap = peer_bootstrap(Settings.from_env(env))
    return (
        bootstrap,
        env["AGENTSTREAM_APP_ID"],
        env["BENCH_PEER_IN"],
        env["BENCH_PEER_OUT"],
        int(env["BENCH_PEER_EVENTS"]),
    )
