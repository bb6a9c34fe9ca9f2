"""Secrets stay out of every output, on the real broker and through the real CLI:
`agentstream tail` and `agentstream replay` print `[REDACTED]` for access tokens (unless
--show-secrets), and the dead letters of `enforce_policy` keep the original bytes with
every token value blanked — escaped key, numeric value and a token in a list included."""

from __future__ import annotations

import base64
import json
import random
from pathlib import Path

import orjson
import pytest

from agentstream.schemas import AgentMessage, DeadLetter, Event
from agentstream.schemas.messages import AuthProof
from agentstream.streams.client import AsyncClient
from agentstream.streams.settings import Settings
from tests.support import Worker, cli, read_topic

pytestmark = pytest.mark.integration


def _secret(n: int = 28) -> str:
    """Upper-case letters only: no uuid, timestamp or field name contains 5 of them."""
    return "".join(random.choice("QWXZJVKY") for _ in range(n))


def _leaks(text: str | bytes, secret: str, width: int = 6) -> list[str]:
    """The `width`-character pieces of `secret` found in `text` (truncation must not
    leave a prefix behind either)."""
    hay = text.decode(errors="replace") if isinstance(text, bytes) else text
    return [
        secret[i : i + width]
        for i in range(len(secret) - width + 1)
        if secret[i : i + width] in hay
    ]


async def test_tail_and_replay_redact_access_tokens(
    settings_env: dict[str, str], tmp_path: Path
) -> None:
    settings = Settings.from_env(settings_env)
    assert cli(settings_env, "topics", "create").returncode == 0
    token, garbage_token = _secret(), _secret()
    message = AgentMessage(
        message_id="m-secret",
        sender_id="agent-7",
        recipient_id="agent-8",
        content="hello",
        auth=AuthProof(method="access-token", token=token, user_id=7),
    )
    # not JSON (truncated): replay shows its bytes base64-encoded
    undecodable = b'{"type": "agent.message", "payload": {"auth": {"token": "%s' % (
        garbage_token.encode()
    )
    async with AsyncClient(settings) as client:
        await client.publish("agent.messages", Event.of(message, source="test"))
        await client.publish_raw("agent.messages", undecodable, key=b"agent-7")

    def tail(*extra: str) -> tuple[list[dict[str, object]], str]:
        res = cli(
            settings_env,
            "tail",
            "agent.messages",
            "--from-beginning",
            "--max",
            "2",
            "--timeout",
            "20",
            *extra,
        )
        assert res.returncode == 0, res.stderr
        lines = [json.loads(line) for line in res.stdout.splitlines()]
        assert sum("error" in x for x in lines) == 1  # the undecodable one, bytes redacted
        return [x for x in lines if "error" not in x], res.stdout + res.stderr

    events, output = tail()
    assert not _leaks(output, token) and not _leaks(output, garbage_token), output
    [event] = events
    auth = event["payload"]["auth"]  # type: ignore[index]
    assert auth == {**auth, "method": "access-token", "token": "[REDACTED]", "user_id": 7}
    assert event["payload"]["message_id"] == "m-secret"  # type: ignore[index]
    events, output = tail("--show-secrets")
    assert events[0]["payload"]["auth"]["token"] == token  # type: ignore[index]

    def replay(*extra: str) -> tuple[list[dict[str, object]], str]:
        res = cli(settings_env, "replay", "--topics", "agent.messages", "--meta", *extra)
        assert res.returncode == 0, res.stderr
        return [json.loads(line) for line in res.stdout.splitlines()], res.stdout + res.stderr

    lines, output = replay()
    assert len(lines) == 2, output
    assert not _leaks(output, token) and not _leaks(output, garbage_token), output
    good = next(line for line in lines if "event" in line)
    assert good["event"]["payload"]["auth"]["token"] == "[REDACTED]"  # type: ignore[index]
    assert good["event"]["payload"]["message_id"] == "m-secret"  # type: ignore[index]
    bad = next(line for line in lines if "error" in line)
    shown = base64.b64decode(bad["value_b64"])  # type: ignore[arg-type]
    assert not _leaks(shown, garbage_token)
    assert shown.startswith(b'{"type": "agent.message", "payload": {"auth": {"token": ')

    out_file = tmp_path / "replay.jsonl"
    res = cli(
        settings_env, "replay", "--topics", "agent.messages", "--meta", "--out", str(out_file)
    )
    assert res.returncode == 0, res.stderr
    assert not _leaks(out_file.read_bytes(), token)
    assert not _leaks(out_file.read_bytes(), garbage_token)

    lines, output = replay("--show-secrets")
    good = next(line for line in lines if "event" in line)
    assert good["event"]["payload"]["auth"]["token"] == token  # type: ignore[index]
    bad = next(line for line in lines if "error" in line)
    assert base64.b64decode(bad["value_b64"]) == undecodable  # type: ignore[arg-type]


async def test_dead_letters_keep_the_bytes_but_no_token(
    settings_env: dict[str, str], tmp_path: Path
) -> None:
    """A record that is JSON but not an event, carrying tokens in spellings and places a
    pattern over raw bytes used to miss: the dead letter has the original bytes with just
    those values replaced."""
    settings = Settings.from_env(settings_env)
    env = {
        **settings_env,
        "AGENTSTREAM_AGENTS": "security",
        "AGENTSTREAM_SECURITY_ENABLED": "false",
    }
    escaped, in_list, deep_in_list = _secret(), _secret(), _secret()
    number = str(random.randrange(10**11, 10**12))
    secrets = {
        f'"{escaped}"': escaped,
        number: number,
        f'"{in_list}"': in_list,
        f'"{deep_in_list}"': deep_in_list,
    }
    raw = (
        '{"type": "agent.message", "schema_version": 2, "source": "hostile",'
        ' "payload": {"sender_id": 5, "tok\\u0065n": "' + escaped + '",'
        ' "auth": {"method": "access-token", "token": ' + number + ', "user_id": 7},'
        ' "metadata": {"list": [{"token": "' + in_list + '"}, '
        '["keep-me", {"Access-Token": ["' + deep_in_list + '", 1]}]],'
        ' "prompt_tokens": 12, "note": "the rest stays"}}}'
    ).encode()
    orjson.loads(raw)  # valid JSON, not a valid event (sender_id, message_id)
    worker = Worker(env, tmp_path / "worker.log").start()
    try:
        async with AsyncClient(settings) as client:
            md = await client.publish_raw("agent.messages", raw, key=b"hostile")
        letters = await read_topic(
            settings.bootstrap, settings.topic("pipeline.deadletter"), expect=1, timeout=60
        )
        assert worker.alive(), worker.tail()
    finally:
        worker.stop()
    [letter] = [ev.payload for _, ev in letters if ev is not None]
    assert isinstance(letter, DeadLetter)
    assert (letter.consumer, letter.partition, letter.offset) == (
        "enforce_policy",
        md.partition,
        md.offset,
    )
    kept = base64.b64decode(letter.original_b64)
    widths = {secret: len(number) if secret == number else 6 for secret in secrets.values()}
    for secret, width in widths.items():
        assert not _leaks(kept, secret, width), kept
    # every other byte of the original is there, in place
    expected = raw
    for literal in secrets:
        expected = expected.replace(literal.encode(), b'"[REDACTED]"')
    expected = expected.replace(
        b'{"Access-Token": ["[REDACTED]", 1]}', b'{"Access-Token": "[REDACTED]"}'
    )
    assert kept == expected
    assert orjson.loads(kept)["payload"]["metadata"]["prompt_tokens"] == 12
    # nothing else shows them either: the dead letter topic through tail, the worker log
    res = cli(
        settings_env,
        "tail",
        "pipeline.deadletter",
        "--from-beginning",
        "--max",
        "1",
        "--timeout",
        "20",
        "--show-secrets",
    )
    assert res.returncode == 0, res.stderr
    log_text = (tmp_path / "worker.log").read_text(errors="replace")
    for secret, width in widths.items():
        assert not _leaks(res.stdout, secret, width) and not _leaks(log_text, secret, width)
