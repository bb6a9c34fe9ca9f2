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

_WITH_CTRL_C = (
    "import runpy, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
    "sys.argv[0] = 'agentstream'; runpy.run_module('agentstream', run_name='__main__')"
)


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
        # Python's own Ctrl-C handler set explicitly: a process started with SIGINT
        # ignored (a background job of a non-interactive shell: how CI may run the suite)
        # passes that on, and Python then never raises KeyboardInterrupt (seen: the
        # command ignored the signal and ran into its request timeout)
        [sys.executable, "-c", _WITH_CTRL_C, *args],
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


async def test_a_cancel_the_kafka_client_turns_into_a_connection_error_stays_a_cancel() -> None:
    """aiokafka closes its connection when the task starting it is cancelled during a
    request, and its bootstrap then fails with a KafkaConnectionError: the cancel (Ctrl-C)
    must not come out as "no broker" (seen on a loaded machine, where the interrupt
    landed during the first metadata request rather than the connect)."""
    import asyncio

    from aiokafka.errors import KafkaConnectionError

    from agentstream.streams.kafka_security import start_client
    from agentstream.streams.settings import Settings

    closed: list[bool] = []
    waiting = asyncio.Event()

    class Client:
        async def _start_unguarded(self) -> None:
            waiting.set()
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                raise KafkaConnectionError("Unable to bootstrap from [...]") from None

        async def stop(self) -> None:
            closed.append(True)

    settings = Settings.from_env({"AGENTSTREAM_KAFKA_CONNECT_TIMEOUT_S": "120"})
    task = asyncio.ensure_future(start_client(Client(), settings, "a test"))
    await waiting.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert closed == [True]
