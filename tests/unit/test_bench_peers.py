"""The peers stage's parts that need no Kafka: the ratios to the peers, the runners' work
and how they find (or refuse) the broker, the peers' virtualenv (what it is built from,
when it is reused) and the probe that checks it does the pipeline's work."""

from __future__ import annotations

import asyncio
import re
import sys
import tomllib
from pathlib import Path

import orjson
import pytest

from agentstream.schemas import SchemaError, encode, registry
from agentstream.streams.settings import Settings
from bench import peers_venv, stage_peers
from bench.__main__ import PEER_RATIOS, discover, ratios
from bench.context import REPO, BenchContext, BenchError
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


# -- the peers' own virtualenv -------------------------------------------------------------


def test_the_project_environment_never_gets_the_peers() -> None:
    """Quix Streams caps pydantic below the project's: it must stay out of the project's
    dependencies and constraints, in the peers' virtualenv only."""
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    declared = [
        *pyproject["project"]["dependencies"],
        *(d for extra in pyproject["project"]["optional-dependencies"].values() for d in extra),
    ]
    names = {peers_venv.canonical(re.split(r"[=<>!~\[; ]", d, maxsplit=1)[0]) for d in declared}
    pinned = peers_venv._pins((REPO / "constraints.txt").read_text())
    for peer in peers_venv.PEERS:
        assert peer not in names and peer not in pinned, peer


def test_the_peers_file_pins_the_peers_and_only_what_differs() -> None:
    project = peers_venv._pins(peers_venv.PROJECT_CONSTRAINTS.read_text())
    peers = peers_venv._pins(peers_venv.PEERS_CONSTRAINTS.read_text())
    for peer in peers_venv.PEERS:
        assert re.fullmatch(rf"{peer}==[\w.]+", peers[peer], re.IGNORECASE), peers.get(peer)
    assert not [line for name, line in peers.items() if project.get(name) == line]


def test_merged_constraints_take_the_peers_pins_over_the_projects(tmp_path: Path) -> None:
    project = tmp_path / "constraints.txt"
    project.write_text("# header\norjson==3.13.0\npydantic==2.14.4\npydantic_core==2.50.5\n")
    peers = tmp_path / "peers.txt"
    peers.write_text("#: resolved with X\npydantic==2.13.5\npydantic-core==2.46.5\nrich==15\n")
    merged = peers_venv.merged_constraints(project, peers).splitlines()
    assert merged == ["orjson==3.13.0", "pydantic==2.13.5", "pydantic-core==2.46.5", "rich==15"]


def test_the_venv_gets_the_projects_runtime_dependencies_and_the_peers() -> None:
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    reqs = peers_venv.requirements()
    assert reqs == [*pyproject["project"]["dependencies"], *peers_venv.PEERS]
    assert not [r for r in reqs if r.startswith("agentstream")]  # imported from the checkout


def test_the_stamp_changes_with_what_the_venv_is_built_from(tmp_path: Path) -> None:
    reqs = peers_venv.requirements()
    constraints = peers_venv.merged_constraints()
    same = peers_venv.stamp(constraints, reqs)
    assert peers_venv.stamp(constraints, reqs) == same
    assert peers_venv.stamp(constraints.replace("==", "==0", 1), reqs) != same
    assert peers_venv.stamp(constraints, [*reqs, "extra"]) != same


def test_a_venv_is_reused_only_while_its_stamp_matches(tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    expected = peers_venv.stamp(peers_venv.merged_constraints(), peers_venv.requirements())
    assert not peers_venv.is_current(venv, expected)
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").symlink_to(sys.executable)
    (venv / peers_venv.STAMP_NAME).write_text(expected)
    assert peers_venv.is_current(venv, expected)
    # current: no pip, no rebuild (the folder is returned as it is)
    assert peers_venv.ensure(venv) == venv / "bin" / "python"
    assert sorted(p.name for p in venv.iterdir()) == sorted(["bin", peers_venv.STAMP_NAME])
    (venv / peers_venv.STAMP_NAME).write_text(expected.replace("requirements", "other"))
    assert not peers_venv.is_current(venv, expected)


def test_the_probe_reports_the_same_work_and_its_cost(tmp_path: Path) -> None:
    ctx = BenchContext("127.0.0.1:1", events=50, work_dir=tmp_path)
    got = stage_peers.check_work(ctx, Path(sys.executable), ctx.payloads()[0])
    assert set(got) == {"peers_env_work_us", "pipeline_env_work_us"}
    assert all(0 < us < 10_000 for us in got.values()), got


@pytest.mark.parametrize(
    ("change", "error"),
    [
        ("probe['outputs'][3] = probe['outputs'][3].replace('agent-', 'agent_')", "differently"),
        ("probe['agentstream'] = '/elsewhere/agentstream/__init__.py'", "/elsewhere"),
    ],
)
def test_the_stage_refuses_peers_that_do_not_do_the_pipelines_work(
    tmp_path: Path, change: str, error: str
) -> None:
    """A python whose probe output differs (another encoding, another checkout's schemas)
    must stop the stage before it measures anything."""
    python = tmp_path / "python"
    python.write_text(
        f"#!{sys.executable}\n"
        "import io, json, runpy, sys\n"
        "out, sys.stdout = sys.stdout, io.StringIO()\n"
        "runpy.run_module('bench.peers_probe', run_name='__main__')\n"
        "probe = json.loads(sys.stdout.getvalue())\n"
        f"{change}\n"
        "out.write(json.dumps(probe))\n"
    )
    python.chmod(0o755)
    ctx = BenchContext("127.0.0.1:1", events=10, work_dir=tmp_path)
    with pytest.raises(BenchError, match=error):
        stage_peers.check_work(ctx, python, ctx.payloads()[0])
