"""The benchmark harness's pure parts: options, stage discovery, ratios, payloads and
the rate arithmetic (no Kafka)."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

from agentstream.schemas import AgentMessage, registry
from bench.__main__ import discover, parse_args, ratios, rounded
from bench.context import BenchContext, BenchError, Throughput, Worker, cpu_keys, cpu_text


def test_defaults_match_the_issue() -> None:
    args = parse_args([])
    assert (args.events, args.payload_bytes, args.partitions) == (200_000, 300, 4)
    assert args.stages == "" and args.out is None and args.guarantee == "at_least_once"


def test_options_parse_and_reject_nonsense() -> None:
    args = parse_args(
        [
            "--events",
            "5000",
            "--payload-bytes",
            "1000",
            "--partitions",
            "2",
            "--stages",
            "core",
            "--out",
            "x.json",
        ]
    )
    assert (args.events, args.payload_bytes, args.partitions, args.stages) == (
        5000,
        1000,
        2,
        "core",
    )
    with pytest.raises(SystemExit):
        parse_args(["--events", "0"])
    with pytest.raises(SystemExit):
        parse_args(["--guarantee", "at_most_once"])


def test_the_workers_run_under_the_chosen_guarantee(tmp_path: Path) -> None:
    assert parse_args([]).guarantee == "at_least_once"
    ctx = BenchContext("127.0.0.1:1", events=50, work_dir=tmp_path, guarantee="exactly_once")
    env = ctx.new_env()
    assert env["AGENTSTREAM_PROCESSING_GUARANTEE"] == "exactly_once"


def test_discover_runs_core_first_and_every_stage_has_the_contract() -> None:
    stages = discover()
    assert next(iter(stages)) == "core"
    for name, module in stages.items():
        assert name == module.NAME
        assert callable(module.run)


def test_ratios_against_naive_and_ceiling() -> None:
    results: dict[str, float | str] = {
        "naive_faust_eps": 1000.0,
        "ceiling_eps": 50_000.0,
        "raw_consume_eps": 90_000.0,
        "produce_eps": 80_000.0,
        "pipeline_eps": 5000.0,
        "policy_eps": 2500.0,
        "llm_error": "boom",
    }
    out = ratios(results)
    assert out == {"pipeline_vs_naive": 5.0, "policy_vs_naive": 2.5, "pipeline_vs_ceiling": 0.1}


def test_ratios_without_a_naive_rate_are_empty_but_ceiling_still_compares() -> None:
    assert ratios({"pipeline_eps": 10.0, "ceiling_eps": 40.0}) == {"pipeline_vs_ceiling": 0.25}
    assert ratios({"core_error": "x"}) == {}


@pytest.mark.parametrize("size", [300, 1000, 4000])
def test_payloads_are_valid_events_of_about_the_requested_size(size: int) -> None:
    ctx = BenchContext("127.0.0.1:1", events=50, payload_bytes=size)
    values = ctx.make_payloads(50)
    assert len(values) == 50
    for raw in values:
        event = registry.decode(raw)
        assert isinstance(event.payload, AgentMessage)
        assert abs(len(raw) - size) <= 12
    ids = {registry.decode(raw).event_id for raw in values}
    assert len(ids) == 50  # distinct events, not one repeated
    senders = {registry.decode(raw).payload.sender_id for raw in values}
    assert len(senders) > 4  # keys spread over partitions


def test_isolated_envs_differ_and_carry_the_run_settings(tmp_path: Path) -> None:
    ctx = BenchContext("127.0.0.1:1", events=10, payload_bytes=300, partitions=3, work_dir=tmp_path)
    a, b = ctx.new_env(), ctx.new_env(AGENTSTREAM_AGENTS="bench.passthrough")
    for key in ("AGENTSTREAM_TOPIC_PREFIX", "AGENTSTREAM_APP_ID", "AGENTSTREAM_DATA_DIR"):
        assert a[key] != b[key]
    assert a["AGENTSTREAM_TOPIC_PARTITIONS"] == "3"
    assert a["AGENTSTREAM_KAFKA_BOOTSTRAP"] == "127.0.0.1:1"
    assert b["AGENTSTREAM_AGENTS"] == "bench.passthrough"
    assert ctx.topic(a, "agent.messages") == a["AGENTSTREAM_TOPIC_PREFIX"] + "agent.messages"


def test_throughput_excludes_what_was_there_at_first_sight() -> None:
    assert Throughput(target=1100, t_first=10.0, count_first=100, t_done=12.0).eps == 500.0
    with pytest.raises(BenchError):
        _ = Throughput(target=100, t_first=5.0, count_first=100, t_done=5.0).eps


def test_a_failing_stage_is_reported_in_the_json_not_a_crash() -> None:
    """Nothing listens on port 9: the core stage fails, the harness still ends with JSON."""
    import json
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("AGENTSTREAM_")}
    env["AGENTSTREAM_KAFKA_BOOTSTRAP"] = "127.0.0.1:9"
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--events", "10", "--stages", "core"],
        cwd=Path(__file__).resolve().parents[2],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 1
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["core_error"].startswith("BrokerError")
    assert "pipeline_eps" not in result


def test_soak_memory_growth_is_end_over_start_and_only_when_both_were_measured() -> None:
    assert ratios({"rss_start_mb": 200.0, "rss_end_mb": 230.0})["rss_growth"] == 1.15
    assert "rss_growth" not in ratios({"rss_start_mb": 200.0, "soak_error": "stalled"})
    assert "rss_growth" not in ratios({"rss_start_mb": 0.0, "rss_end_mb": 10.0})


def test_cpu_per_event_and_busy_share_come_from_the_watched_span_only() -> None:
    # 2 s of wall time, 1 s of the worker's CPU, 1,000 events after the first sighting
    measured = Throughput(1_100, 10.0, 100, 12.0, cpu_first=3.0, cpu_done=4.0)
    assert measured.cpu_us == pytest.approx(1_000.0)
    assert measured.busy == pytest.approx(0.5)
    assert cpu_keys("policy", measured) == {"policy_cpu_us": 1000.0, "policy_busy": 0.5}
    # no worker watched: no CPU keys, not zeros
    bare = Throughput(1_100, 10.0, 100, 12.0)
    assert bare.cpu_us is None and bare.busy is None
    assert cpu_keys("policy", bare) == {} and cpu_text(bare) == ""
    # output that grew too fast to time has no rate (`eps` raises), and no CPU figures
    instant = Throughput(100, 5.0, 100, 5.0, cpu_first=1.0, cpu_done=1.0)
    assert instant.cpu_us is None and instant.busy is None


def test_a_workers_cpu_time_is_read_from_the_running_process(tmp_path: Path) -> None:
    spin = (
        "import time\n"
        "t = time.process_time()\n"
        "while time.process_time() - t < 0.3: pass\n"
        "print('spun', flush=True)\n"
        "time.sleep(60)\n"
    )
    worker = Worker({}, tmp_path / "w.log", [sys.executable, "-c", spin]).start()
    try:
        deadline = time.monotonic() + 30
        while "spun" not in (tmp_path / "w.log").read_text():
            worker.check_alive()
            assert time.monotonic() < deadline, worker.tail()
            time.sleep(0.02)
        used = worker.cpu_s()
        assert used is not None and used >= 0.3
    finally:
        worker.stop()
    assert worker.cpu_s() is None  # an ended process has no running total


def test_the_json_keeps_a_busy_share_to_the_hundredth_and_rates_to_the_tenth() -> None:
    assert rounded("policy_busy", 0.8649) == 0.86
    assert rounded("policy_cpu_us", 121.86) == 121.9
    assert rounded("policy_eps", 7345.34) == 7345.3
    assert rounded("delivery", "native") == "native"
