"""`python -m bench` end to end on a tiny run: the core stage measures all three
variants and the peers stage its two runners against the real broker, and the last stdout
line is the JSON result."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from aiokafka.admin import AIOKafkaAdminClient

# "repo-var": writes var/bench/, beside which test_cli_mistakes checks var/ untouched
pytestmark = [pytest.mark.integration, pytest.mark.xdist_group("repo-var")]

REPO = Path(__file__).resolve().parents[2]
CORE_KEYS = {
    "ceiling_eps",
    "raw_consume_eps",
    "naive_faust_eps",
    "pipeline_eps",
    "pipeline_vs_naive",
    "pipeline_vs_ceiling",
}
PEER_KEYS = {
    "quix_eps",
    "samework_ceiling_eps",
    "pipeline_vs_quix",
    "pipeline_vs_samework",
    "peers_env_work_us",
    "pipeline_env_work_us",
}


@pytest.fixture(scope="module")
def peers_python() -> Path:
    """The peers stage's virtualenv, built here rather than inside the bench run, so that
    pip's half minute or so is not spent in the run's time budget and a failure says
    what went wrong. It is cached under the user cache dir (bench.peers_venv), so only the
    first run on a machine, or after a constraints change, builds it."""
    from bench import peers_venv

    try:
        return peers_venv.ensure()
    except peers_venv.PeersVenvError as exc:
        pytest.fail(f"the peers stage's virtualenv could not be built, so bench cannot run: {exc}")


# building the peers' virtualenv (first run only) comes on top of the run itself
@pytest.mark.timeout(600)
async def test_core_stage_prints_json_last(
    kafka_bootstrap: str, tmp_path: Path, peers_python: Path
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AGENTSTREAM_")}
    env["AGENTSTREAM_KAFKA_BOOTSTRAP"] = kafka_bootstrap
    out_file = tmp_path / "bench.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench",
            "--events",
            "4000",
            "--partitions",
            "2",
            "--stages",
            "core,peers,soak",
            "--out",
            str(out_file),
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    last = proc.stdout.strip().splitlines()[-1]
    result = json.loads(last)
    assert set(result) >= CORE_KEYS | PEER_KEYS, result
    assert "policy_vs_quix" not in result  # the policy stage did not run
    assert not [k for k in result if k.endswith("_error")], result
    assert (result["events"], result["partitions"]) == (4000, 2)
    for key in CORE_KEYS | PEER_KEYS:
        assert result[key] > 0, key
    assert result["pipeline_vs_naive"] == pytest.approx(
        result["pipeline_eps"] / result["naive_faust_eps"], rel=0.01
    )
    assert result["pipeline_vs_quix"] == pytest.approx(
        result["pipeline_eps"] / result["quix_eps"], rel=0.01
    )
    # the soak stage sampled the pipeline worker's memory
    assert result["rss_start_mb"] > 20 and result["rss_end_mb"] > 20, result
    assert result["rss_growth"] == pytest.approx(
        result["rss_end_mb"] / result["rss_start_mb"], rel=0.01
    )
    assert json.loads(out_file.read_text()) == result
    assert "core: (c) pipeline" in proc.stderr  # progress goes to stderr, not stdout
    assert "peers: quix_eps" in proc.stderr
    # the peers ran in their own virtualenv and re-encoded the events as the pipeline does
    assert f"peers: {peers_python} (" in proc.stderr
    assert "same output on 4000 events" in proc.stderr

    # the run cleaned up after itself
    run_dirs = [line for line in proc.stderr.splitlines() if "logs in " in line]
    run_id = Path(run_dirs[0].rsplit("logs in ", 1)[1]).name
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    await admin.start()
    try:
        left = [t for t in await admin.list_topics() if t.startswith(f"b{run_id}x")]
    finally:
        await admin.close()
    assert left == []
