"""Commands built on the client, the settings and the keychain alone start without the
Faust app and the agents (about 0.6 s of CPU less per command); the others still load
them, as a worker has them. Each case is a fresh interpreter: what a command imports is
what a user waits for."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from agentstream.streams.cli import _marked_without_agents, cli, load_commands
from tests.support import REPO

PROBE = """
import json, sys
from agentstream.streams.cli import main
try:
    main(sys.argv[1:])
except SystemExit as exc:
    code = exc.code
else:
    code = 0
loaded = sorted(
    m for m in sys.modules if m.startswith("agentstream.agents.") and m.endswith(".agent")
)
import logging
quiet = [type(f).__name__ for f in logging.getLogger("aiokafka.cluster").filters]
print(json.dumps({
    "code": code, "app": "agentstream.streams.app" in sys.modules, "agents": loaded,
    "quiet": quiet,
}))
"""


def probe(tmp_path: Path, *args: str) -> dict[str, object]:
    env = {
        "PATH": "/usr/bin:/bin",
        "HOME": str(tmp_path),
        "PYTHONPATH": str(REPO),
        "AGENTSTREAM_DATA_DIR": str(tmp_path / "data"),
        "AGENTSTREAM_KAFKA_BOOTSTRAP": "127.0.0.1:9",
        "AGENTSTREAM_KEYRING_BACKEND": "encrypted-file",
        "AGENTSTREAM_KEYRING_FILE": str(tmp_path / "keyring.json"),
        "AGENTSTREAM_KEYRING_PASSWORD": "test",
    }
    done = subprocess.run(
        [sys.executable, "-c", PROBE, *args],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        input="",
    )
    last = done.stdout.strip().splitlines()[-1]
    return dict(json.loads(last))


@pytest.mark.parametrize(
    "args",
    [
        ("config",),
        ("publish", "agent.messages", "--dry-run"),
        ("credentials", "get", "--secret", "nothing-here"),
        ("llm", "ask", "hi", "--temperature", "9"),
        ("llm", "providers"),
        ("tail", "no.such.topic"),
        ("kafka", "status"),
        ("schemas", "export", "exported"),
        ("web", "token", "list"),
    ],
    ids=[
        "config",
        "publish",
        "credentials",
        "llm-ask",
        "llm-providers",
        "tail",
        "kafka",
        "schemas",
        "web",
    ],
)
def test_a_client_command_runs_without_the_app_and_agents(
    tmp_path: Path, args: tuple[str, ...]
) -> None:
    got = probe(tmp_path, *args)
    assert got["app"] is False and got["agents"] == [], got
    # aiokafka's start-up noise is quieted all the same (`streams.logging_setup`)
    assert "NewTopicNoise" in got["quiet"], got  # type: ignore[operator]


def test_a_command_reading_the_agents_tables_still_loads_them(tmp_path: Path) -> None:
    # `topics list` names the tables' changelog topics: the agents declare them
    got = probe(tmp_path, "topics", "list")
    assert got["app"] is True, got
    assert "agentstream.agents.security.agent" in got["agents"], got  # type: ignore[operator]


def test_the_mark_on_a_group_covers_its_commands() -> None:
    load_commands()
    import click

    group = cli.commands["credentials"]
    assert isinstance(group, click.Group)
    sub = group.commands["get"]
    root = click.Context(cli)
    ctx = click.Context(sub, parent=click.Context(group, parent=root))
    assert _marked_without_agents(ctx)
    rebuild = cli.commands["rebuild"]
    assert not _marked_without_agents(click.Context(rebuild, parent=root))
