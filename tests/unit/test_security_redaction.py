"""`streams.redaction`: secrets out of dead letters, `tail` and `replay` — parsed, not
pattern-matched, whatever the spelling of the key, the type of the value or the depth;
truncated and garbage bytes fail closed; LLM token counts are not secrets."""

from __future__ import annotations

import base64
import random
import time

import orjson
import pytest

from agentstream.schemas import AgentMessage, DeadLetter, Event, encode
from agentstream.schemas.llm import (
    ChatMessage,
    LLMConfig,
    LLMContext,
    LLMRequest,
    LLMResponse,
    Usage,
)
from agentstream.schemas.messages import AuthProof
from agentstream.streams.redaction import (
    MAX_DEPTH,
    REDACTED,
    SECRET_KEYS,
    is_secret_key,
    redact_event_dict,
    redact_raw,
)
from agentstream.streams.replay import ReplayRecord

SECRET = "QZXJVWQZXJVW-s3cret"  # no 5-letter run of it occurs in an event's other fields


def secret_token(n: int = 24) -> str:
    """Upper-case letters only: no uuid, timestamp or field name contains a run of them."""
    return "".join(random.choice("QWXZJVKY") for _ in range(n))


def fragments(token: str, width: int = 5) -> list[bytes]:
    return [token[i : i + width].encode() for i in range(len(token) - width + 1)]


def leaks(out: bytes, token: str, width: int = 5) -> list[bytes]:
    return [f for f in fragments(token, width) if f in out]


# -- the cases of test_security_policy.py's redact_raw test (the function it replaces) ----
def test_raw_bytes_lose_their_tokens_even_when_truncated() -> None:
    assert redact_raw(b'{"auth": {"token": "abc\\"def", "user_id": 1}}') == (
        b'{"auth": {"token": "[REDACTED]", "user_id": 1}}'
    )
    assert redact_raw(b'{"a":{"token" : "tok-123') == b'{"a":{"token" : "[REDACTED]"'
    assert redact_raw(b'{"token":"a","b":{"token":"b"}}') == (
        b'{"token":"[REDACTED]","b":{"token":"[REDACTED]"}}'
    )
    assert redact_raw(b"not json, no secret") == b"not json, no secret"


# -- spellings --------------------------------------------------------------------------
SPELLINGS = [
    '"token"',
    '"Token"',
    '"TOKEN"',
    '"tok\\u0065n"',  # an escaped letter: the JSON key is "token"
    '"\\u0074\\u006F\\u006b\\u0065\\u006e"',  # every letter escaped, mixed-case hex
    '"\\u0054OKEN"',
    '"to_ken"',
    '"to-ken"',
    '"to ken"',
    '"to\\u00adken"',  # a soft hyphen (invisible format character)
    '"ｔｏｋｅｎ"',  # fullwidth letters: NFKC makes them "token"  # noqa: RUF001
    '"\\uff54\\uff4f\\uff4b\\uff45\\uff4e"',  # the same, escaped
    '"\\ud835\\udc2doken"',  # MATHEMATICAL BOLD SMALL T as a surrogate pair, then "oken"
    '"access_token"',
    '"Access-Token"',
    '"accessToken"',
    '"refresh_token"',
    '"id_token"',
    '"api_key"',
    '"apikey"',
    '"API-KEY"',
    '"x-api-key"',
    '"password"',
    '"Password"',
    '"passwd"',
    '"secret"',
    '"client_secret"',
    '"private_key"',
    '"authorization"',
    '"Authorization"',
    '"Proxy-Authorization"',
    '"cookie"',
    '"Set-Cookie"',
]


@pytest.mark.parametrize("key", SPELLINGS)
def test_every_spelling_of_a_secret_key_is_redacted(key: str) -> None:
    raw = ('{"before": "keep-1", ' + key + ': "' + SECRET + '", "after": [1, "keep-2"]}').encode()
    out = redact_raw(raw)
    assert SECRET.encode() not in out
    assert out == raw.replace(f'"{SECRET}"'.encode(), b'"[REDACTED]"')  # the rest untouched
    parsed = orjson.loads(out)
    assert parsed["before"] == "keep-1" and parsed["after"] == [1, "keep-2"]
    assert REDACTED in parsed.values()
    # the same document, parsed: redact_event_dict agrees
    shown = redact_event_dict(orjson.loads(raw))
    assert SECRET not in orjson.dumps(shown).decode() and REDACTED in shown.values()
    # and the same document truncated right after the secret's first characters
    cut = raw[: raw.index(SECRET.encode()) + 6]
    assert not leaks(redact_raw(cut), SECRET)


@pytest.mark.parametrize("key", SPELLINGS)
def test_every_spelling_is_found_in_garbage_too(key: str) -> None:
    """Not JSON at all (a stray quote first): the fallback still finds the member."""
    raw = ('garbage" {' + key + ': "' + SECRET + '", "after": "keep"').encode()
    assert SECRET.encode() not in redact_raw(raw)


def test_the_documented_key_set() -> None:
    assert {
        "token",
        "accesstoken",
        "apikey",
        "password",
        "secret",
        "authorization",
    } <= SECRET_KEYS
    for name in SECRET_KEYS:
        assert is_secret_key(name) and is_secret_key(name.upper())


# -- not secret -------------------------------------------------------------------------
NOT_SECRET = [
    "prompt_tokens",
    "completion_tokens",
    "total_tokens",
    "max_tokens",
    "token_count",
    "tokens",
    "tokenizer",
    "key",
    "key_id",
    "keys",
    "signature",
    "signed_by",
    "redacted",
    "user_id",
    "method",
    "secrets_count",
    "password_hint_shown",
]


@pytest.mark.parametrize("key", NOT_SECRET)
def test_ordinary_fields_are_not_redacted(key: str) -> None:
    assert not is_secret_key(key)
    raw = orjson.dumps({key: 1234, "nested": [{key: "visible"}]})
    assert redact_raw(raw) == raw
    data = orjson.loads(raw)
    assert redact_event_dict(data) is data


def test_llm_token_counts_are_not_secrets() -> None:
    response = Event.of(
        LLMResponse(
            request_id="r1",
            status="completed",
            content="the answer",
            usage=Usage(prompt_tokens=12, completion_tokens=34, total_tokens=46),
            metadata={"token_count": 46, "tokens": ["a", "b"]},
        ),
        source="test",
    )
    request = Event.of(
        LLMRequest(
            request_id="r1",
            agent_id="a1",
            context=LLMContext(messages=[ChatMessage(role="user", content="hi")]),
            config=LLMConfig(model="m", max_tokens=256),
        ),
        source="test",
    )
    for ev in (response, request):
        raw = encode(ev)
        assert redact_raw(raw) == raw
        data = orjson.loads(raw)
        assert redact_event_dict(data) is data
    usage = orjson.loads(encode(response))["payload"]["usage"]
    assert usage["prompt_tokens"] == 12 and usage["total_tokens"] == 46


# -- values of every type, at every depth -----------------------------------------------
def test_values_of_every_type_and_nesting() -> None:
    raw = (
        b'{"token": 123456, "a": {"b": [{"token": ["s3cret-1", {"x": "s3cret-2"}]}]},'
        b' "password": {"value": "s3cret-3", "n": 7}, "secret": true, "api_key": -1.5e3,'
        b' "list": [[{"authorization": "Bearer s3cret-4"}], "keep"], "access_token": null,'
        b' "token_count": 99}'
    )
    out = redact_raw(raw)
    for leaked in (b"123456", b"s3cret", b"-1.5e3", b"true"):
        assert leaked not in out
    assert orjson.loads(out) == {
        "token": REDACTED,
        "a": {"b": [{"token": REDACTED}]},
        "password": REDACTED,
        "secret": REDACTED,
        "api_key": REDACTED,
        "list": [[{"authorization": REDACTED}], "keep"],
        "access_token": None,  # nothing in it
        "token_count": 99,
    }
    assert redact_event_dict(orjson.loads(raw)) == orjson.loads(out)


def test_escaped_key_and_unicode_escaped_value() -> None:
    raw = b'{"tok\\u0065n": "\\u0073\\u0033cr\\u0065t", "note": "caf\\u00e9"}'
    out = redact_raw(raw)
    assert out == b'{"tok\\u0065n": "[REDACTED]", "note": "caf\\u00e9"}'
    assert orjson.loads(out) == {"token": REDACTED, "note": "café"}


def test_redact_event_dict_copies_and_never_changes_its_input() -> None:
    data = {"payload": {"auth": {"token": "s3cret", "user_id": 7}, "content": "hi"}}
    before = orjson.dumps(data)
    shown = redact_event_dict(data)
    assert shown is not data and orjson.dumps(data) == before
    assert shown == {"payload": {"auth": {"token": REDACTED, "user_id": 7}, "content": "hi"}}


def test_an_access_token_message_end_to_end() -> None:
    token = secret_token()
    ev = Event.of(
        AgentMessage(
            message_id="m1",
            sender_id="a1",
            recipient_id="a2",
            content="hello",
            auth=AuthProof(method="access-token", token=token, user_id=7),
        ),
        source="test",
    )
    raw = encode(ev)
    out = redact_raw(raw)
    assert not leaks(out, token)
    assert out == raw.replace(f'"{token}"'.encode(), b'"[REDACTED]"')
    shown = redact_event_dict(ev.model_dump(mode="json"))
    auth = shown["payload"]["auth"]
    assert auth["token"] == REDACTED and auth["user_id"] == 7
    assert auth["method"] == "access-token"
    assert not leaks(orjson.dumps(shown), token)


def test_truncated_anywhere_the_token_never_survives() -> None:
    """Every prefix of a record (what a size cap or a broken producer leaves) keeps no
    5-character piece of the token."""
    token = secret_token(32)
    ev = Event.of(
        AgentMessage(
            message_id="m1",
            sender_id="a1",
            recipient_id="a2",
            content="hello",
            auth=AuthProof(method="access-token", token=token, user_id=7),
            metadata={"k": [1, {"access_token": token}]},
        ),
        source="test",
    )
    raw = encode(ev)
    start = raw.index(b'"auth"')
    for cut in range(start, len(raw)):
        assert not leaks(redact_raw(raw[:cut]), token), raw[:cut]


@pytest.mark.parametrize(
    ("raw", "gone", "kept"),
    [
        # a list value cut off: everything after the key goes
        (b'{"token": ["s3cret", "more', b"s3cret", b'{"token": '),
        # an object value, then the rest of the record
        (b'{"password": {"a": "s3cret"}, "x": "keep", "bad', b"s3cret", b'"x": "keep"'),
        # a string value with a comma and a brace inside
        (b'{"token": "s3,cr}et", "x": "keep", ', b"cr}et", b'"x": "keep"'),
        # a bare scalar in garbage: blanked up to the next , } or ]
        (b'{"token": s3cret_unquoted, "x": "keep", ', b"s3cret", b'"x": "keep"'),
        # a secret name where no parse can bound its value: everything after it goes
        (b'{"token" s3cret "x": "keep"', b"s3cret", b'{"token"'),
        # quotes out of step (a stray quote first): the regex pass still catches it
        (b'x"y "tok\\u0065n": "s3cret", "z": 1', b"s3cret", b'x"y '),
    ],
)
def test_garbage_fails_closed(raw: bytes, gone: bytes, kept: bytes) -> None:
    out = redact_raw(raw)
    assert gone not in out and kept in out, out


def test_garbage_without_secrets_is_kept_byte_for_byte() -> None:
    for raw in (
        b"",
        b"\xff\xfe\x00garbage",
        b'{"type": "agent.message"',
        b"[1, 2, 3]",
        b'["token", "a value named like a key is not a secret"]',
        b"x" * 100_000,
    ):
        assert redact_raw(raw) == raw


# -- depth ------------------------------------------------------------------------------
def test_a_10k_deep_document_has_its_too_deep_part_replaced() -> None:
    depth = 10_000
    inner = b'{"k": "s3cret-deep", "token": 424242, "flag": true, "none": null}'
    raw = b'{"shallow": "keep", "token": "s3cret-top", "deep": ' + b"[" * depth
    raw += inner + b"]" * depth + b"}"
    started = time.perf_counter()
    out = redact_raw(raw)
    assert time.perf_counter() - started < 5  # iterative and linear: no recursion limit
    assert b"s3cret" not in out and b"424242" not in out
    # the shallow part member by member, the too-deep part every string and number
    # (names too); the shape is kept, so the output is as valid JSON as the input
    deep = b'{"[REDACTED]": "[REDACTED]", "[REDACTED]": "[REDACTED]", "[REDACTED]": true, '
    deep += b'"[REDACTED]": null}'
    assert out == (
        b'{"shallow": "keep", "token": "[REDACTED]", "deep": '
        + b"[" * depth
        + deep
        + b"]" * depth
        + b"}"
    )


def test_depth_bound_applies_to_parseable_documents_too() -> None:
    """Deeper than MAX_DEPTH but within orjson's limit: the part past the bound is not
    walked member by member, so its strings and numbers go."""
    depth = MAX_DEPTH + 5
    raw = b"[" * depth + b'"deep-string", 17, false' + b"]" * depth
    out = redact_raw(raw)
    assert orjson.loads(out) is not None
    assert b"deep-string" not in out and b"17" not in out and b"false" in out
    shallow = b"[" * (MAX_DEPTH - 1) + b'"kept", 17' + b"]" * (MAX_DEPTH - 1)
    assert redact_raw(shallow) == shallow


def test_a_10k_deep_dict_is_walked_without_recursion() -> None:
    """A parsed document past the bound: each too-deep container goes as a whole, so the
    result is shallow enough for orjson to encode again (tail and replay print it)."""
    root: dict[str, object] = {"shallow": "keep", "token": "s3cret-top"}
    node = root
    for i in range(10_000):
        child: dict[str, object] = {"k": f"level-{i + 2}"}
        node["next"] = child
        node = child
    shown = redact_event_dict(root)
    assert shown["shallow"] == "keep" and shown["token"] == REDACTED
    levels = 1
    node = shown
    while isinstance(node.get("next"), dict):
        node = node["next"]  # type: ignore[assignment]
        levels += 1
    assert levels == MAX_DEPTH and node["next"] == REDACTED
    printed = orjson.dumps(shown)  # encodable again
    assert f'"level-{MAX_DEPTH}"'.encode() in printed
    assert f'"level-{MAX_DEPTH + 1}"'.encode() not in printed and b"s3cret" not in printed


# -- dead letters shown by tail / replay ------------------------------------------------
def test_the_bytes_inside_a_dead_letter_are_redacted_for_display() -> None:
    token = secret_token()
    original = b'{"type": "agent.message", "payload": {"auth": {"token": "%s"}}' % token.encode()
    letter = Event.of(
        DeadLetter(
            original_b64=base64.b64encode(original).decode(),
            original_size=len(original),
            topic="agent.messages",
            partition=0,
            offset=1,
            error_class="UndecodableEvent",
            error_message="not JSON",
            consumer="llm",
        ),
        source="test",
    )
    data = orjson.loads(encode(letter))
    shown = redact_event_dict(data)
    kept = base64.b64decode(shown["payload"]["original_b64"])
    assert not leaks(kept, token) and kept.startswith(b'{"type": "agent.message"')
    assert token in base64.b64decode(data["payload"]["original_b64"]).decode()  # unchanged


def test_random_documents_round_trip() -> None:
    """Random JSON with secrets at random places: none survives, the output parses to
    the input with exactly those values replaced."""
    rng = random.Random(7)
    names = ["token", "Api-Key", "tok\\u0065n", "a", "b", "tokens", "prompt_tokens"]

    def value(depth: int) -> str:
        kind = rng.randrange(6 if depth < 6 else 3)
        if kind == 0:
            return orjson.dumps(secret_token(8)).decode()
        if kind == 1:
            return str(rng.randrange(10**9))
        if kind == 2:
            return rng.choice(["true", "false", "null", '"x,}]"'])
        if kind in (3, 4):
            members = ", ".join(
                f'"{rng.choice(names)}" : {value(depth + 1)}' for _ in range(rng.randrange(4))
            )
            return "{" + members + "}"
        return "[" + ",".join(value(depth + 1) for _ in range(rng.randrange(4))) + "]"

    def expected(node: object) -> object:
        if isinstance(node, dict):
            return {
                k: (REDACTED if is_secret_key(k) and v is not None else expected(v))
                for k, v in node.items()
            }
        if isinstance(node, list):
            return [expected(v) for v in node]
        return node

    for _ in range(300):
        raw = value(0).encode()
        out = redact_raw(raw)
        assert orjson.loads(out) == expected(orjson.loads(raw)), raw
        assert redact_event_dict(orjson.loads(raw)) == orjson.loads(out)


# -- replay's JSON lines ----------------------------------------------------------------
def _record(value: bytes) -> ReplayRecord:
    try:
        data = orjson.loads(value)
    except orjson.JSONDecodeError:
        return ReplayRecord("t", 0, 1, 1000, b"k", value, None, "not JSON")
    return ReplayRecord("t", 0, 1, 1000, b"k", value, data, None)


def test_replay_lines_redact_unless_asked_not_to() -> None:
    token = secret_token()
    ev = Event.of(
        AgentMessage(
            message_id="m1",
            sender_id="a1",
            recipient_id="a2",
            auth=AuthProof(method="access-token", token=token, user_id=7),
        ),
        source="test",
    )
    raw = encode(ev)
    line = orjson.loads(_record(raw).json_line())
    assert line["event"]["payload"]["auth"]["token"] == REDACTED
    assert line["event"]["payload"]["message_id"] == "m1"
    assert not leaks(_record(raw).json_line(), token)
    shown = orjson.loads(_record(raw).json_line(show_secrets=True))
    assert shown["event"]["payload"]["auth"]["token"] == token
    # a record without secrets is embedded as it is on the wire
    plain = encode(
        Event.of(AgentMessage(message_id="m", sender_id="a", recipient_id="b"), source="x")
    )
    assert _record(plain).json_line().endswith(b'"event":' + plain + b"}\n")
    # undecodable: the base64 of the redacted bytes
    cut = raw[: raw.index(token.encode()) + 8]
    line = orjson.loads(_record(cut).json_line())
    assert not leaks(base64.b64decode(line["value_b64"]), token)
    line = orjson.loads(_record(cut).json_line(show_secrets=True))
    assert base64.b64decode(line["value_b64"]) == cut


def test_replay_of_a_hostile_deep_record_neither_crashes_nor_leaks() -> None:
    """orjson reads 1024 levels but writes 254: a redacted deep record must still make a
    line (a replay for an audit must not die on one hostile record)."""
    depth = 600
    raw = b'{"token": "s3cret-top", "x": ' + b"[" * depth + b'"s3cret-deep"' + b"]" * depth + b"}"
    line = orjson.loads(_record(raw).json_line())
    assert line["event"]["token"] == REDACTED and b"s3cret" not in orjson.dumps(line)
