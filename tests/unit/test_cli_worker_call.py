"""Commands that read a worker's web views, against a real HTTP server on loopback: a
503 during a rebalance, an unknown key, a bad filter and no worker at all each end in a
clear message and exit 1, never a traceback."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from click.testing import CliRunner

import agentstream.agents.audit.cli as audit_cli
import agentstream.agents.comms.cli as comms_cli
import agentstream.agents.heartbeat.cli as heartbeat_cli
import agentstream.agents.llm.cli as llm_cli
import agentstream.streams.cli.top as top_cli
from agentstream.streams.cli import cli
from agentstream.streams.settings import get_settings

# imported: they register `checkpoints`, `comms`, `agents`, `llm`, `top`
COMMANDS = (audit_cli, comms_cli, heartbeat_cli, llm_cli, top_cli)
ROW = {"agent_id": "a1", "status": "up", "last_heartbeat_at": None, "missed_beats": 0}


#: the Authorization header of every request the fake worker got
SEEN_AUTH: list[str | None] = []


class Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        SEEN_AUTH.append(self.headers.get("Authorization"))
        if self.path.startswith("/agents/status/anon"):
            self._send(401, {"error": "authentication required", "reason": "unknown token"})
        elif self.path.startswith("/agents/status/readonly"):
            self._send(403, {"error": "forbidden", "reason": "GET needs scope admin"})
        elif self.path.startswith("/agents/status/rebalancing"):
            self._send(503, {"error": "partition 3 has no owner right now", "partition": 3})
        elif self.path.startswith("/agents/status/nobody"):
            self._send(404, {"error": "unknown agent"})
        elif self.path == "/agents/status/team%2Fa1":  # an id with a slash, quoted
            self._send(200, {**ROW, "agent_id": "team/a1", "beats": 1})
        elif self.path.startswith("/agents/status/a1"):
            self._send(200, {**ROW, "beats": 4})
        elif self.path.startswith("/comms"):
            self._send(400, {"error": "since: after until"})
        else:
            self._send(500, {"error": "boom"})

    def _send(self, status: int, body: object) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def worker_port(monkeypatch: pytest.MonkeyPatch) -> Iterator[int]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    port = server.server_address[1]
    monkeypatch.setenv("AGENTSTREAM_WEB_PORT", str(port))
    monkeypatch.setenv("AGENTSTREAM_WEB_HOST", "127.0.0.1")
    get_settings.cache_clear()
    try:
        yield port
    finally:
        server.shutdown()
        server.server_close()
        get_settings.cache_clear()


def test_answers_and_errors_of_a_worker_view(worker_port: int) -> None:
    runner = CliRunner()
    ok = runner.invoke(cli, ["agents", "status", "a1"])
    assert ok.exit_code == 0 and "a1" in ok.output and "beats 4" in ok.output

    slash = runner.invoke(cli, ["agents", "status", "team/a1"])
    assert slash.exit_code == 0 and "team/a1" in slash.output, slash.output

    busy = runner.invoke(cli, ["agents", "status", "rebalancing"])
    assert busy.exit_code == 1
    assert "cannot answer now: partition 3 has no owner right now" in busy.output
    assert "try again" in busy.output and "Traceback" not in busy.output

    unknown = runner.invoke(cli, ["agents", "status", "nobody"])
    assert unknown.exit_code == 1 and "unknown agent 'nobody'" in unknown.output

    # a filter the worker refuses: its reason, exit 1 (one the CLI can judge alone, a
    # time that is none or an --until before the --since, is a usage error before
    # anything connects: test_cli_mistakes)
    bad = runner.invoke(cli, ["comms", "--since", "-1h", "--until", "now"])
    assert bad.exit_code == 1 and "HTTP 400: since: after until" in bad.output

    broken = runner.invoke(cli, ["agents", "status"])
    assert broken.exit_code == 1 and "HTTP 500: boom" in broken.output


def test_no_worker_listening(monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again when the block ends: nobody listens
    monkeypatch.setenv("AGENTSTREAM_WEB_PORT", str(port))
    get_settings.cache_clear()
    try:
        res = CliRunner().invoke(cli, ["agents", "status", "a1"])
    finally:
        get_settings.cache_clear()
    assert res.exit_code == 1 and f"no worker answering at http://127.0.0.1:{port}" in res.output


def test_the_cli_sends_its_token_and_says_what_a_401_or_403_means(
    worker_port: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the CLI's token from the env secret source (AGENTSTREAM_SECRET_WEB_TOKEN)
    monkeypatch.setenv("AGENTSTREAM_SECRET_SOURCES", "env")
    monkeypatch.setenv("AGENTSTREAM_SECRET_WEB_TOKEN", "ast_cli-token")
    get_settings.cache_clear()
    runner = CliRunner()
    SEEN_AUTH.clear()
    ok = runner.invoke(cli, ["agents", "status", "a1"])
    assert ok.exit_code == 0 and SEEN_AUTH == ["Bearer ast_cli-token"]

    anon = runner.invoke(cli, ["agents", "status", "anon"])
    assert anon.exit_code == 1 and "Traceback" not in anon.output
    assert len(anon.output.strip().splitlines()) == 1, anon.output
    assert "HTTP 401: authentication required: unknown token" in anon.output
    assert "secret web.token) was refused" in anon.output and "--for-cli" in anon.output
    assert "ast_cli-token" not in anon.output

    ro = runner.invoke(cli, ["agents", "status", "readonly"])
    assert ro.exit_code == 1 and len(ro.output.strip().splitlines()) == 1
    assert "HTTP 403: forbidden: GET needs scope admin" in ro.output

    monkeypatch.delenv("AGENTSTREAM_SECRET_WEB_TOKEN")
    SEEN_AUTH.clear()
    none = runner.invoke(cli, ["agents", "status", "anon"])
    assert SEEN_AUTH == [None]
    assert none.exit_code == 1 and "there is no secret web.token" in none.output


class Foreign(BaseHTTPRequestHandler):
    """Something else than a worker on the worker's port: every path answers `ANSWER`."""

    ANSWER: tuple[str, bytes] = ("text/html", b"<html>hello</html>")

    def do_GET(self) -> None:
        kind, data = self.ANSWER
        self.send_response(200)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_POST = do_GET

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def foreign_port(monkeypatch: pytest.MonkeyPatch) -> Iterator[int]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Foreign)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("AGENTSTREAM_WEB_PORT", str(server.server_address[1]))
    monkeypatch.setenv("AGENTSTREAM_WEB_HOST", "127.0.0.1")
    get_settings.cache_clear()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        get_settings.cache_clear()


FOREIGN_ANSWERS = {
    "html": ("text/html", b"<html>hello</html>"),
    "json-list": ("application/json", b"[1, 2]"),
    "json-string": ("application/json", b'"hello"'),
    "json-object": ("application/json", b'{"hello": "world"}'),
    # the keys of every view, their values of no view's shape
    "json-odd-rows": (
        "application/json",
        b'{"agents": ["a1"], "counts": 3, "records": [1], "breakers": {"p": 1}, '
        b'"agent": {"a": 1}, "provider": {}, "model": {}, "agent_id": "a1", "status": "up"}',
    ),
}


@pytest.mark.parametrize("answer", FOREIGN_ANSWERS, ids=list(FOREIGN_ANSWERS))
@pytest.mark.parametrize(
    "args",
    [
        ("agents", "status"),
        ("agents", "status", "a1"),
        ("comms",),
        ("llm", "breakers"),
        ("llm", "usage"),
        ("top", "--once"),
        ("checkpoints", "--take"),
    ],
    ids=" ".join,
)
def test_an_answer_that_is_no_workers_is_one_line_exit_1(
    args: tuple[str, ...], answer: str, foreign_port: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # HTML, a list or a foreign object were JSONDecodeError, TypeError or KeyError
    # tracebacks; `llm usage` printed nothing and exited 0; `top` said the worker closed
    # the stream; `checkpoints --take` printed the foreign body and exited 0
    monkeypatch.setattr(Foreign, "ANSWER", FOREIGN_ANSWERS[answer])
    res = CliRunner().invoke(cli, list(args))
    assert res.exit_code == 1, (res.output, res.exception)
    assert res.output.startswith("Error: http://127.0.0.1:"), res.output
    assert "not an agentstream worker's answer" in res.output
    assert len(res.output.strip().splitlines()) == 1, res.output
