"""The peers stage's pure parts: the ratios to the peers, the runners' work and how they
find (or refuse) the broker (no Kafka)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import orjson
import pytest

from agentstream.schemas import SchemaError, encode, registry
from agentstream.streams.settings import Settings
from bench import stage_peers
from bench.__main__ import PEER_RATIOS, discover, ratios
from bench.context import BenchContext
from bench.peers_common import PeerSecurityError, peer_bootstrap, peer_env, work


def test_peer_ratios_use_rates_of_the_same_run() -> None:
    results: dict[str, float | str] = {
        "naive_faust_eps": 1000.0,
        "pipeline_eps": 20_000.0,
        "policy_eps": 10_000.0,
        "quix_eps": 50_000.0,
        "samework_ceiling_eps": 100_000.0,
    }
    out = ratios(results)
    assert out["pipeline_vs_quix"] == 0.4
    assert out["pipeline_vs_samework"] == 0.2
    assert out["policy_vs_quix"] == 0.2
    # the peers are references, not stages of ours to compare with the naive agent
    assert "quix_vs_naive" not in out and "samework_ceiling_vs_naive" not in out
    assert out["pipeline_vs_naive"] == 20.0


def test_peer_ratios_are_omitted_without_both_rates() -> None:
    only_peers: dict[str, float | str] = {"quix_eps": 5.0, "samework_ceiling_eps": 9.0}
    assert ratios(only_peers) == {}
    no_policy: dict[str, float | str] = {"pipeline_eps": 4.0, **only_peers}
    assert set(ratios(no_policy)) == {"pipeline_vs_quix", "pipeline_vs_samework"}
    failed: dict[str, float | str] = {"pipeline_eps": 4.0, "peers_error": "boom"}
    assert ratios(failed) == {}


def test_the_stage_reports_the_rates_the_ratios_read() -> None:
    stages = discover()
    assert stages["peers"] is stage_peers
    assert set(stage_peers.RUNNERS) == {"quix_eps", "samework_ceiling_eps"}
    peer_rates = {peer for _ours, peer in PEER_RATIOS.values()}
    assert peer_rates == set(stage_peers.RUNNERS)
    sinks = [sink for _module, sink in stage_peers.RUNNERS.values()]
    assert len(set(sinks)) == len(sinks)  # every runner writes its own topic


def test_work_is_decode_validate_reencode() -> None:
    ctx = BenchContext("127.0.0.1:1", events=20)
    for raw in ctx.make_payloads(20):
        out = work(raw)
        assert out == encode(registry.decode(raw))
        assert registry.decode(out) == registry.decode(raw)


def test_work_validates_like_the_pipeline() -> None:
    raw = BenchContext("127.0.0.1:1", events=1).make_payloads(1)[0]
    broken = orjson.loads(raw)
    del broken["payload"]["sender_id"]
    with pytest.raises(SchemaError):
        work(orjson.dumps(broken))
    with pytest.raises(SchemaError):
        work(b"not json")


def test_a_peer_connects_to_a_plaintext_cluster() -> None:
    settings = Settings.from_env({"AGENTSTREAM_KAFKA_BOOTSTRAP": "h:9092"})
    assert peer_bootstrap(settings) == "h:9092"


@pytest.mark.parametrize(
    "env",
    [
        {"AGENTSTREAM_KAFKA_SECURITY_PROTOCOL": "SSL"},
        {
            "AGENTSTREAM_KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
            "AGENTSTREAM_KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
            "AGENTSTREAM_KAFKA_SASL_USERNAME": "bench",
        },
        {
            "AGENTSTREAM_KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT",
            "AGENTSTREAM_KAFKA_SASL_MECHANISM": "PLAIN",
            "AGENTSTREAM_KAFKA_SASL_USERNAME": "bench",
        },
    ],
)
def test_a_peer_refuses_a_secured_cluster_rather_than_connect_in_plaintext(
    env: dict[str, str],
) -> None:
    settings = Settings.from_env({"AGENTSTREAM_KAFKA_BOOTSTRAP": "h:9093", **env})
    with pytest.raises(PeerSecurityError, match=env["AGENTSTREAM_KAFKA_SECURITY_PROTOCOL"]):
        peer_bootstrap(settings)


def test_the_stage_fails_on_a_secured_cluster_before_touching_it(tmp_path: Path) -> None:
    ctx = BenchContext("127.0.0.1:1", events=10, work_dir=tmp_path)
    ctx.settings = Settings.from_env(
        {"AGENTSTREAM_KAFKA_BOOTSTRAP": "127.0.0.1:1", "AGENTSTREAM_KAFKA_SECURITY_PROTOCOL": "SSL"}
    )
    with pytest.raises(PeerSecurityError):
        asyncio.run(stage_peers.run(ctx))
    assert ctx.workers == []


def test_a_runner_reads_its_environment(tmp_path: Path) -> None:
    ctx = BenchContext("127.0.0.1:7", events=10, work_dir=tmp_path)
    env = ctx.new_env(BENCH_PEER_IN="p.in", BENCH_PEER_OUT="p.out", BENCH_PEER_EVENTS="10")
    assert peer_env(env) == ("127.0.0.1:7", env["AGENTSTREAM_APP_ID"], "p.in", "p.out", 10)
    other = ctx.new_env(BENCH_PEER_IN="p.in", BENCH_PEER_OUT="p.out2", BENCH_PEER_EVENTS="10")
    assert peer_env(other)[1] != peer_env(env)[1]  # a fresh consumer group per runner
