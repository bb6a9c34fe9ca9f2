"""The views stay authenticated however the app is started: `agentstream worker`
installs the middleware, and so does the app itself at its first start — a worker run
as `faust -A agentstream.streams.app worker` once served every view to anyone."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.support import REPO, wait_until, web_tokens, web_url

pytestmark = pytest.mark.integration


def test_faust_s_own_entry_point_serves_no_view_without_a_token(
    settings_env: dict[str, str], tmp_path: Path
) -> None:
    env = {**settings_env, "AGENTSTREAM_AGENTS": "health"}
    tokens = web_tokens(env)
    log = (tmp_path / "worker.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "faust", "-A", "agentstream.streams.app", "worker", "-l", "info"],
        env=env,
        cwd=REPO,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        with httpx.Client(base_url=web_url(env), timeout=5, trust_env=False) as http:

            def health() -> bool:
                assert proc.poll() is None, (tmp_path / "worker.log").read_text()[-3000:]
                try:
                    return http.get("/health").status_code == 200
                except httpx.HTTPError:
                    return False

            wait_until(health, 90, 0.3, what="the worker's /health")
            assert http.get("/metrics").status_code == 401
            assert http.get("/").status_code == 401
            assert http.get("/metrics", headers=tokens.headers("read")).status_code == 200
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
