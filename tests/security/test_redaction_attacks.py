"""A secret written in a form the parsed record does not show must not reach `tail` or
`replay` either.

A JSON object may name a member twice; orjson keeps the last occurrence, so the value of
an earlier one is in the record's bytes but not in its parse. `tail` and `replay` write
the bytes as they are when the parse holds no secret, and `--format json`, `raw` and
`--meta` printed a token that way: ``{"token": "<secret>", "token": null}``. The same goes
for a member of a non-secret object named twice (``"auth"`` with the token, then
``"auth": {}``), and for the dead letters that carry such bytes."""

from __future__ import annotations

import base64
from types import SimpleNamespace

import orjson
import pytest

from agentstream.schemas import AgentMessage, Event, encode
from agentstream.streams.redaction import redact_event_dict, redact_raw
from agentstream.streams.replay import ReplayRecord, parse_record

SECRET = b"SECRET-TOKEN"

HIDDEN = [
    # the secret member, then the same name with null: the parse keeps the null
    b'{"type":"x","payload":{"auth":{"token":"SECRET-TOKEN","token":null}}}',
    # in the middle of three
    b'{"type":"x","payload":{"auth":{"token":null,"token":"SECRET-TOKEN","token":null}}}',
    # the last one spelled with an escape, or another spelling of the same secret name
    b'{"type":"x","payload":{"auth":{"token":"SECRET-TOKEN","tok\\u0065n":null}}}',
    b'{"type":"x","payload":{"auth":{"tok\\u0065n":"SECRET-TOKEN","token":null}}}',
    # of every type
    b'{"type":"x","payload":{"password":["SECRET-TOKEN"],"password":null}}',
    b'{"type":"x","payload":{"api_key":{"v":"SECRET-TOKEN"},"api_key":null}}',
    # a non-secret member named twice: the first holds the secret member
    b'{"type":"x","payload":{"auth":{"token":"SECRET-TOKEN"},"auth":{}}}',
    b'{"type":"x","payload":{"auth":{"token":"SECRET-TOKEN"}},"payload":{}}',
    # nested in arrays, deep
    b'{"type":"x","payload":{"l":[1,[{"a":{"b":[{"secret":"SECRET-TOKEN","secret":null}]}}]]}}',
    # with whitespace between the tokens (bytes not as orjson writes them)
    b'{ "type" : "x" , "payload" : { "token" : "SECRET-TOKEN" , "token" : null } }',
]

FIRST_WINS = [
    # the secret member last: the parse holds it (these were redacted already)
    b'{"type":"x","payload":{"auth":{"token":null,"token":"SECRET-TOKEN"}}}',
    b'{"type":"x","payload":{"auth":{"tok\\u0065n":"SECRET-TOKEN"}}}',
]


def record(value: bytes, key: bytes | None = b"k") -> ReplayRecord:
    rec = SimpleNamespace(value=value, key=key, partition=1, offset=2, timestamp=1000)
    return parse_record("t", rec)


@pytest.mark.parametrize("raw", HIDDEN + FIRST_WINS)
@pytest.mark.parametrize("fmt", ["json", "pretty", "raw"])
@pytest.mark.parametrize("meta", [False, True])
def test_no_format_prints_a_secret_the_parse_does_not_show(
    raw: bytes, fmt: str, meta: bool
) -> None:
    rec = record(raw)
    assert rec.data is not None  # valid JSON: an event record, not an error
    out = rec.render(fmt, meta=meta)
    assert SECRET not in out, (fmt, meta, out)
    if fmt != "pretty":  # (pretty is re-encoded from the parse, which dropped it)
        assert SECRET in rec.render(fmt, meta=meta, show_secrets=True)
    if fmt != "raw":
        assert orjson.loads(out)  # still one JSON value


@pytest.mark.parametrize("raw", HIDDEN + FIRST_WINS)
def test_raw_bytes_lose_every_occurrence(raw: bytes) -> None:
    out = redact_raw(raw)
    assert SECRET not in out
    assert orjson.loads(out)  # still JSON, kept but for the secret values


@pytest.mark.parametrize("raw", HIDDEN)
def test_a_dead_letter_of_such_bytes_is_shown_without_them(raw: bytes) -> None:
    letter = {
        "type": "pipeline.dead_letter",
        "payload": {"original_b64": base64.b64encode(raw).decode()},
    }
    shown = redact_event_dict(letter)
    original = base64.b64decode(shown["payload"]["original_b64"])
    assert SECRET not in original


def test_a_dead_letter_named_twice_does_not_hide_its_bytes() -> None:
    """The secret is base64 inside the first of two ``payload`` members: no byte scan
    can see it, only the parse (which dropped it) — such a record is re-encoded."""
    inner = base64.b64encode(b'{"token":"SECRET-TOKEN"}').decode()
    raw = (
        b'{"type":"pipeline.dead_letter","payload":{"original_b64":"%s"},'
        b'"payload":{"original_b64":""}}' % inner.encode()
    )
    for fmt in ("json", "pretty"):
        for meta in (False, True):
            out = record(raw).render(fmt, meta=meta)
            assert inner.encode() not in out, (fmt, meta)


def test_an_ordinary_record_is_written_as_it_is_on_the_wire() -> None:
    ev = Event.of(
        AgentMessage(
            message_id="m",
            sender_id="a",
            recipient_id="b",
            content="tokens: 12, password policy",
            metadata={"prompt_tokens": 3, "l": [{"a": None}]},
        ),
        source="s",
    )
    wire = encode(ev)
    rec = record(wire)
    assert rec.render("json") == wire + b"\n"
    assert rec.render("raw") == wire + b"\n"
    assert rec.render("raw", meta=True) == b"t\t1\t2\t1000\tk\t" + wire + b"\n"
    assert rec.render("json", meta=True).endswith(b'"event":' + wire + b"}\n")
    # bytes not as orjson writes them, without a name twice: as they are too
    spaced = b'{ "type" : "x" , "payload" : { "token" : null, "a": [1, 2] } }'
    assert record(spaced).render("json") == spaced + b"\n"
    assert record(spaced).render("raw") == spaced + b"\n"
    assert redact_raw(spaced) == spaced
    # a name twice without any secret: written as orjson reads it, nothing lost to see
    twice = b'{"type":"x","payload":{"a":1,"a":2}}'
    assert record(twice).render("raw") == twice + b"\n"
