"""Ctrl-C while a command connects to a broker that never answers: the interrupt is said
once (`Aborted!`, click's exit 1), with no "Unclosed AIOKafkaConsumer" dump of a client
left open and no traceback.

The "broker" is a listener that accepts connections and never answers; SIGINT goes to
the command once it has connected (polled, with a deadline)."""

from __future__ import annotations

import asyncio
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


def test_ctrl_c_while_publish_waits_for_a_line_on_a_terminal(tmp_path: Path) -> None:
    """`publish` reading a terminal ignored the first Ctrl-C: the read blocked the event
    loop, and asyncio's handler only cancels the task, which went on waiting for the
    next line. The read is off the loop now: the first Ctrl-C ends it."""
    import os
    import pty
    import select

    master, slave = pty.openpty()
    env = base_env(tmp_path, "127.0.0.1:1")  # never contacted: no line is valid
    proc = subprocess.Popen(
        [sys.executable, "-c", _WITH_CTRL_C, "publish", "agent.messages"],
        env=env,
        cwd=tmp_path,
        stdin=slave,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    os.close(slave)
    try:
        assert proc.stderr is not None
        os.write(master, b"not json\n")  # answered on stderr once it is reading
        said = b""
        deadline = time.monotonic() + 60
        while b"line 1: JSONDecodeError" not in said and time.monotonic() < deadline:
            if select.select([proc.stderr], [], [], 0.2)[0]:
                said += os.read(proc.stderr.fileno(), 4096)
            assert proc.poll() is None, said
        assert b"line 1: JSONDecodeError" in said, said
        # now waiting for line 2 on the terminal
        proc.send_signal(signal.SIGINT)
        try:
            _out, err = proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            pytest.fail("the first Ctrl-C did not end publish waiting for a line")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        os.close(master)
    text = (said + err).decode(errors="replace")
    assert "Traceback" not in text, text
    assert text.strip().splitlines()[-1] == "Aborted!", text
    assert proc.returncode == 1, text


async def test_lines_read_off_the_loop_are_the_files_lines(tmp_path: Path) -> None:
    import io

    from agentstream.streams.cli.core import READ_CHUNK, lines_off_loop

    long = b"x" * (3 * READ_CHUNK + 5)  # across reads
    data = b"a\n\n" + long + b"\r\nlast without newline"
    path = tmp_path / "lines"
    path.write_bytes(data)
    expected = [b"a\n", b"\n", long + b"\r\n", b"last without newline"]
    with path.open("rb") as f:
        assert [line async for line in lines_off_loop(f)] == expected == list(io.BytesIO(data))
    assert [line async for line in lines_off_loop(io.BytesIO(data))] == expected
    with path.open("rb") as f:  # left early: the thread ends, and the file is the caller's
        async for _ in lines_off_loop(f):
            break
        # the thread reads on to the end of the file by itself (fewer chunks than it may
        # read ahead); a seek before it ended raced with its reads of the shared offset
        deadline = time.monotonic() + 10
        while any(t.name == "agentstream-read-lines" for t in threading.enumerate()):
            assert time.monotonic() < deadline, "the reading thread did not end"
            await asyncio.sleep(0.01)
        f.seek(0)  # the thread read a duplicate of its descriptor: it shares the offset
        assert f.read(2) == b"a\n"


class _Chunk(bytes):
    """A read's bytes that count what concatenating them copies (`copied`, shared)."""

    copied = [0]

    def __add__(self, other: object) -> bytes:
        assert isinstance(other, bytes)
        self.copied[0] += len(self) + len(other)
        return bytes(self) + other

    def __radd__(self, other: object) -> bytes:
        assert isinstance(other, bytes)
        self.copied[0] += len(other) + len(self)
        return other + bytes(self)


async def test_a_long_line_is_not_copied_once_per_read(monkeypatch: pytest.MonkeyPatch) -> None:
    # a line was grown by `pending += chunk` and searched whole after every 64 KiB read:
    # quadratic, 32 MiB on one line took seconds. Every byte read is copied into its line
    # once (a join), never per read
    import types

    from agentstream.streams.cli import core

    reads = [_Chunk(b"x" * core.READ_CHUNK) for _ in range(64)]
    reads += [_Chunk(b"x\nshort\nla"), _Chunk(b"st"), _Chunk(b"")]
    fake_os = types.SimpleNamespace(
        dup=lambda fd: fd, close=lambda fd: None, read=lambda fd, n: reads.pop(0)
    )
    monkeypatch.setattr(core, "os", fake_os)
    _Chunk.copied[0] = 0
    stream = types.SimpleNamespace(fileno=lambda: 1234)
    lines = [line async for line in core.lines_off_loop(stream)]  # type: ignore[arg-type]
    assert lines == [b"x" * (64 * core.READ_CHUNK + 1) + b"\n", b"short\n", b"last"]
    assert _Chunk.copied[0] == 0  # by `+`, not once per read
