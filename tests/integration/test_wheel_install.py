"""The wheel, installed as a user would: into a fresh virtualenv beside the OpenAI Agents
SDK (whose import name, `agents`, is the folder name of our agents), run from a folder
that is not the checkout.

One test on purpose: building and installing is most of its time. It checks that
- both import: `from agents import Agent` is the SDK's, `from agentstream import Client`
  ours, and the wheel installs no top-level name but `agentstream`;
- the console script works without the source tree: `--version`, `--help`, and a broker
  started by `agentstream kafka start` from the installed files (its Maven project and
  log4j config are package data), with state under $XDG_STATE_HOME, never inside
  site-packages, then a worker (the `security` agent) deciding on a published message,
  read back with `tail`;
- `--help` creates nothing (no state folder appears for asking).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
#: the SDK release this test pins (bump on purpose: its dependencies meet ours here)
OPENAI_AGENTS = "openai-agents==0.24.0"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run(cmd: list[str], env: dict[str, str], cwd: Path, timeout: float = 600) -> str:
    done = subprocess.run(
        cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False
    )
    assert done.returncode == 0, f"{cmd}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


def test_the_wheel_works_outside_the_checkout_beside_the_openai_agents_sdk(
    tmp_path: Path,
) -> None:
    wheels = tmp_path / "wheels"
    run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(wheels), str(REPO)],
        dict(os.environ),
        tmp_path,
    )
    (wheel,) = wheels.glob("agentstream-*.whl")
    tops = {n.split("/")[0] for n in zipfile.ZipFile(wheel).namelist()}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"agentstream"}

    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", str(venv)], dict(os.environ), tmp_path)
    py = venv / "bin" / "python"
    home = tmp_path / "home"
    home.mkdir()
    cwd = tmp_path / "elsewhere"  # not the checkout: nothing importable from the cwd
    cwd.mkdir()
    env = {
        # a clean environment: only what a user's shell would have, pip's cache kept
        "PATH": f"{venv / 'bin'}:{os.environ['PATH']}",
        "HOME": str(home),
        "XDG_STATE_HOME": str(tmp_path / "state"),
        # the Kafka jars already fetched by the test session's broker (same pom.xml)
        "XDG_CACHE_HOME": os.environ.get("XDG_CACHE_HOME", str(Path.home() / ".cache")),
        "PIP_CACHE_DIR": os.environ.get("PIP_CACHE_DIR", str(Path.home() / ".cache" / "pip")),
        "PIP_DISABLE_PIP_VERSION_CHECK": "1",
        "PYTHONDONTWRITEBYTECODE": "1",
    }
    # the tested versions of our dependencies, as `make install` and the image use them
    run(
        [
            str(py),
            "-m",
            "pip",
            "install",
            "-q",
            "-c",
            str(REPO / "constraints.txt"),
            OPENAI_AGENTS,
            str(wheel),
        ],
        env,
        cwd,
        timeout=900,
    )

    probe = """
import importlib.metadata as md, json, agents, agentstream
from agents import Agent
from agentstream import Client, AsyncClient
from agentstream.schemas import AgentMessage
print(json.dumps({
    "sdk": agents.__file__, "sdk_dist": md.version("openai-agents"),
    "ours": agentstream.__file__, "version": agentstream.__version__,
    "agent": type(Agent(name="a", instructions="x")).__module__,
    "client": Client.__module__, "message": AgentMessage.__module__,
}))
"""
    seen = json.loads(run([str(py), "-c", probe], env, cwd))
    site = venv / "lib"
    assert Path(seen["sdk"]).is_relative_to(site) and "/agents/" in seen["sdk"]
    assert Path(seen["ours"]).is_relative_to(site)
    assert seen["agent"].startswith("agents.")  # the SDK's Agent, not ours
    assert seen["client"] == "agentstream.streams.client"
    assert seen["version"] != "0+unknown"

    agentstream = str(venv / "bin" / "agentstream")
    assert run([agentstream, "--version"], env, cwd).startswith("agentstream, version ")
    assert run([agentstream, "--help"], env, cwd).startswith("Usage: agentstream")
    assert not (tmp_path / "state").exists(), "--help created the state folder"

    port, controller = free_port(), free_port()
    kafka_env = {
        **env,
        "AGENTSTREAM_KAFKA_PORT": str(port),
        "AGENTSTREAM_KAFKA_CONTROLLER_PORT": str(controller),
        "AGENTSTREAM_KAFKA_HEAP": "-Xms256m -Xmx512m",
        "AGENTSTREAM_TOPIC_PARTITIONS": "1",
    }
    run([agentstream, "kafka", "start"], kafka_env, cwd, timeout=300)
    try:
        state = tmp_path / "state" / "agentstream"
        assert (state / "kafka" / "broker.pid").is_file(), sorted(map(str, state.rglob("*")))
        (installed,) = venv.glob("lib/python*/site-packages/agentstream")
        assert not list(installed.rglob("var")), "state written inside site-packages"
        run([agentstream, "topics", "create"], kafka_env, cwd, timeout=120)
        # a worker from the installed copy: Faust's autodiscovery finds agentstream.agents
        worker_env = {
            **kafka_env,
            "AGENTSTREAM_AGENTS": "security",
            "AGENTSTREAM_SECURITY_DEFAULT_ACTION": "allow",
            "AGENTSTREAM_WEB_AUTH": "off",
            "AGENTSTREAM_WEB_PORT": str(free_port()),
            "AGENTSTREAM_SECRET_SOURCES": "env",
        }
        log = (tmp_path / "worker.log").open("wb")
        worker = subprocess.Popen(
            [agentstream, "worker", "-l", "info"],
            env=worker_env,
            cwd=cwd,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            message = {"message_id": "m1", "sender_id": "a", "recipient_id": "b", "content": "hi"}
            done = subprocess.run(
                [agentstream, "publish", "agent.messages"],
                env=kafka_env,
                cwd=cwd,
                input=json.dumps(message) + "\n",
                capture_output=True,
                text=True,
                timeout=120,
            )
            assert done.returncode == 0, done.stderr
            # tail waits (by its --timeout) for the worker's decision to come out
            out = run(
                [
                    agentstream,
                    "tail",
                    "agent.messages.accepted",
                    "-o",
                    "beginning",
                    "--max",
                    "1",
                    "--timeout",
                    "90",
                ],
                kafka_env,
                cwd,
                timeout=180,
            )
            log.flush()
            worker_log = (tmp_path / "worker.log").read_text(errors="replace")
            assert out, f"the worker accepted nothing:\n{worker_log[-3000:]}"
            assert json.loads(out)["payload"]["message_id"] == "m1"
            assert "Traceback" not in worker_log, worker_log[-3000:]
        finally:
            worker.terminate()
            try:
                worker.wait(timeout=60)
            except subprocess.TimeoutExpired:
                worker.kill()
                worker.wait(timeout=30)
            log.close()
        assert (state / "worker").is_dir(), "the worker's state is not under the state folder"
    finally:
        subprocess.run(
            [agentstream, "kafka", "stop"], env=kafka_env, cwd=cwd, timeout=120, check=False
        )
