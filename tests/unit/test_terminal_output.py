"""What a hostile sender writes into its own events reaches operators' terminals only as
visible text: no escape sequence (OSC 52 clipboard writes, title changes, cursor moves
that hide other lines), no rich markup, no extra line."""

from __future__ import annotations

import io
from typing import Any

import pytest

from agentstream.streams.cli import term_safe

HOSTILE = {
    "osc52": "a\x1b]52;c;ZWNobyBwd25lZA==\x1b\\",
    "title": "b\x1b]0;owned\x07",
    "erase-line": "c\x1b[2K\x1b[1A",
    "carriage-return": "d\rok",
    "newline": "e\nfake line",
    "c1-csi": "f\x9b2J",
    "del": "g\x7f",
}


@pytest.mark.parametrize("text", HOSTILE.values(), ids=HOSTILE.keys())
def test_control_characters_become_visible_escapes(text: str) -> None:
    safe = term_safe(text)
    assert not any(ord(ch) < 0x20 or 0x7F <= ord(ch) < 0xA0 for ch in safe), repr(safe)
    assert safe.startswith(text[0])


def test_ordinary_text_is_unchanged() -> None:
    for text in ("planner-1", "Ünïcödé ✓ 日本", "[bold]not markup here[/bold]", ""):
        assert term_safe(text) == text
    assert term_safe(None) == "None" and term_safe(3) == "3"


def _snapshot(agent_id: str, model: str) -> dict[str, Any]:
    from agentstream.streams.console import Tail
    from tests.unit.test_console import build, item

    status = {"agent_id": agent_id, "previous": "up", "current": "down", "reason": "timeout"}
    doc = build(tail=Tail(status=[item(990, status)], decisions=[], checkpoints=[]))
    doc["llm"]["usage"] = {"model": {model: {"requests": 1, "total_tokens": 5}}}
    doc["agents"]["list"].append({"agent_id": agent_id, "status": "down"})
    return doc


def test_top_shows_hostile_fields_as_text() -> None:
    from rich.console import Console

    from agentstream.streams.cli.top import render

    doc = _snapshot(HOSTILE["osc52"] + "[link=https://evil.example]x[/link]", HOSTILE["title"])
    out = io.StringIO()
    Console(file=out, force_terminal=True, width=300, color_system=None).print(render(doc))
    shown = out.getvalue()
    assert "\x1b]52" not in shown and "\x1b]0;" not in shown and "\x1b]8;" not in shown
    assert "[link=https://evil.example]" in shown  # shown as typed, not a link
    assert "\\x1b]52;c;" in shown  # the escape is visible for what it is


class _Answer:
    def __init__(self, body: dict[str, Any]) -> None:
        self.body = body

    def json(self) -> dict[str, Any]:
        return self.body


def test_agents_status_and_comms_print_hostile_ids_as_text(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from click.testing import CliRunner

    from agentstream.agents.comms import cli as comms_cli
    from agentstream.agents.heartbeat import cli as heartbeat_cli

    evil = HOSTILE["osc52"] + HOSTILE["newline"]
    status = {
        "agents": [
            {
                "agent_id": evil,
                "status": "up",
                "last_heartbeat_at": None,
                "missed_beats": 0,
                "beats": 1,
            }
        ],
        "counts": {"up": 1, "down": 0},
        "deciding": True,
    }
    comms = {
        "records": [
            {
                "recorded_at": 0,
                "agent_id": evil,
                "kind": "message",
                "record_id": HOSTILE["title"],
                "counterparty": HOSTILE["erase-line"],
                "amount": 1.0,
                "unit": HOSTILE["c1-csi"],
            }
        ],
        "counts": {evil: {"message": 1}},
    }
    monkeypatch.setattr(heartbeat_cli, "worker_call", lambda *a, **k: _Answer(status))
    monkeypatch.setattr(comms_cli, "worker_call", lambda *a, **k: _Answer(comms))
    runner = CliRunner()
    for command, lines in ((heartbeat_cli.agents_status, 2), (comms_cli.comms, 2)):
        done = runner.invoke(command, [], standalone_mode=False)
        assert done.exception is None, done.output
        out = done.output
        assert not any((ord(c) < 0x20 and c != "\n") or 0x7F <= ord(c) < 0xA0 for c in out)
        assert len(out.splitlines()) == lines, out  # no line the sender added


def test_llm_usage_and_breakers_print_hostile_names_as_text(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from click.testing import CliRunner

    from agentstream.agents.llm import cli as llm_cli

    evil = HOSTILE["osc52"] + HOSTILE["newline"]
    totals = {"requests": 1, "prompt_tokens": 2, "completion_tokens": 3}
    usage = {
        "agent": {evil: totals},
        "provider": {HOSTILE["title"]: totals},
        "model": {HOSTILE["c1-csi"]: totals},
        "budgets": [{"agent": evil, "model": HOSTILE["erase-line"], "window": "1d"}],
    }
    breakers = {
        "breakers": {
            HOSTILE["title"]: {
                "live": {"state": "open", "failures": 5},
                "recorded": {"reason": HOSTILE["carriage-return"]},
            }
        }
    }
    runner = CliRunner()
    for answer, command, lines in ((usage, llm_cli.usage, 4), (breakers, llm_cli.breakers, 1)):
        monkeypatch.setattr(llm_cli, "worker_call", lambda *a, _b=answer, **k: _Answer(_b))
        done = runner.invoke(command, [], standalone_mode=False)
        assert done.exception is None, done.output
        out = done.output
        assert not any((ord(c) < 0x20 and c != "\n") or 0x7F <= ord(c) < 0xA0 for c in out)
        assert len(out.splitlines()) == lines, out  # no line the sender added


def test_checkpoints_print_hostile_fields_as_text(monkeypatch: pytest.MonkeyPatch) -> None:
    from datetime import UTC, datetime

    from click.testing import CliRunner

    from agentstream.agents.audit import checkpoints
    from agentstream.agents.audit import cli as audit_cli
    from agentstream.schemas.pipeline import CheckpointWritten

    cp = CheckpointWritten(
        checkpoint_id="c" * 32,
        worker_id=HOSTILE["title"] + HOSTILE["newline"],
        reason=HOSTILE["osc52"],
        taken_at=datetime(2026, 1, 1, tzinfo=UTC),
        tables={HOSTILE["erase-line"]: "0" * 64},
    )

    async def listed(*a: Any, **k: Any) -> list[Any]:
        return [(None, cp)]

    monkeypatch.setattr(checkpoints, "list_checkpoints", listed)
    done = CliRunner().invoke(audit_cli.checkpoints_cmd, [], standalone_mode=False)
    assert done.exception is None, done.output
    out = done.output
    assert not any((ord(c) < 0x20 and c != "\n") or 0x7F <= ord(c) < 0xA0 for c in out)
    assert len(out.splitlines()) == 1, out


BIDI = [chr(c) for c in (*range(0x202A, 0x202F), *range(0x2066, 0x206A), 0x200E, 0x200F)]


@pytest.mark.parametrize("ch", BIDI, ids=[f"U+{ord(c):04X}" for c in BIDI])
def test_bidi_controls_become_visible(ch: str) -> None:
    # a right-to-left override reorders what follows on the screen ("Trojan Source")
    safe = term_safe(f"ok{ch}evil")
    assert ch not in safe and safe.startswith("ok") and safe.endswith("evil")
    assert f"\\u{ord(ch):04x}" in safe


def _answer(status: int, body: Any) -> Any:
    import httpx

    return httpx.Response(status, json=body, request=httpx.Request("GET", "http://w:1/x"))


@pytest.mark.parametrize("field", ["error", "reason"])
def test_an_error_a_worker_forwards_reaches_the_terminal_as_text(field: str) -> None:
    from agentstream.streams.cli import _error_text
    from agentstream.streams.cli.top import _refusal

    body = {"error": "unavailable", field: "\x1b]52;c;SGk=\x07 \u202eevil"}
    for status in (401, 403, 503, 500):
        for text in (
            _error_text(_answer(status, body)),
            _refusal("http://w:1", _answer(status, body), True),
        ):
            assert "\x1b" not in text and "\x07" not in text and "\u202e" not in text, text
            assert "\\x1b]52" in text
    import httpx

    plain = httpx.Response(502, text="\x1b[2Jgateway", request=httpx.Request("GET", "http://w"))
    assert "\x1b" not in _error_text(plain) and "\x1b" not in _refusal("u", plain, False)
