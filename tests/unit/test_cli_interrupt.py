"""Ctrl-C while a command connects to a broker that never answers: the interrupt is said
once (`Aborted!`, click's exit 1), with no "Unclosed AIOKafkaConsumer" dump of a client
left open and no traceback.

The "broker" is a listener that accepts connections and never answers; SIGINT goes to
the command once it has connected (polled, with a deadline)."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.unit.test_cli_mistakes import base_env


@pytest.fixture
def silent_broker() -> Iterator[tuple[int, list[socket.socket]]]:
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    accepted: list[socket.socket] = []

    def accept() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:  # closed: the test is over
                return
            accepted.append(conn)  # held open, never answered

    threading.Thread(target=accept, daemon=True).start()
    try:
        yield server.getsockname()[1], accepted
    finally:
        server.close()
        for conn in accepted:
            conn.close()


@pytest.mark.parametrize(
    "args",
    [
        ("tail", "agent.messages"),
        ("replay", "--topics", "agent.messages", "--since", "-1h"),
        ("audit", "verify", "--since", "-1h"),
        ("policy", "list"),
        ("llm", "ask", "hi"),
    ],
    ids=" ".join,
)
def test_ctrl_c_while_connecting_closes_the_client(
    args: tuple[str, ...], silent_broker: tuple[int, list[socket.socket]], tmp_path: Path
) -> None:
    port, accepted = silent_broker
    env = base_env(tmp_path, f"127.0.0.1:{port}")
    env["AGENTSTREAM_KAFKA_CONNECT_TIMEOUT_S"] = "120"  # the interrupt comes first
    proc = subprocess.Popen(
        [sys.executable, "-m", "agentstream", *args],
        env=env,
        cwd=tmp_path,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while not accepted and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert accepted, "the command never connected"
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    text = out + err
    assert "Unclosed" not in text, text
    assert "Traceback" not in text, text
    assert "object at 0x" not in text, text
    assert err.strip() == "Aborted!", text
    assert proc.returncode == 1, text
