"""The console's stream hub: a bound on streams per worker and per token. One token (a
read one is enough) held all of a worker's streams, and every other operator got a 503.
And a bound on what its tail keeps of each dead letter: the whole original bytes of the
last 1,000 came to a gigabyte per worker."""

from __future__ import annotations

import base64
from types import SimpleNamespace

import orjson
import pytest

from agentstream.agents.health import console
from agentstream.agents.health.console import Hub, TooManyStreams, TopicTail
from agentstream.streams import console as snapshot


async def test_one_token_holds_at_most_its_share_of_the_streams(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    hub = Hub()
    monkeypatch.setattr(hub, "_ensure", lambda: None)  # no sampling task in a unit test
    mine = [hub.subscribe("tok1") for _ in range(console.MAX_STREAMS_PER_TOKEN)]
    with pytest.raises(TooManyStreams, match="with this token"):
        hub.subscribe("tok1")
    other = hub.subscribe("tok2")  # another operator still gets one
    hub.unsubscribe(mine.pop())
    mine.append(hub.subscribe("tok1"))  # a closed stream gives its place back
    for q in [*mine, other]:
        hub.unsubscribe(q)
    assert hub.owners == {} and hub.owner_of == {} and hub.clients == set()


async def test_the_worker_bound_holds_whatever_the_tokens(monkeypatch: pytest.MonkeyPatch) -> None:
    hub = Hub()
    monkeypatch.setattr(hub, "_ensure", lambda: None)
    opened = [hub.subscribe(f"tok{i}") for i in range(console.MAX_STREAMS)]
    with pytest.raises(TooManyStreams, match="on this worker"):
        hub.subscribe("another")
    assert len(opened) == console.MAX_STREAMS


def test_the_tail_keeps_a_bounded_redacted_preview_of_each_dead_letter() -> None:
    original = b'{"auth": {"token": "hunter2"}, "pad": "' + b"x" * 900_000 + b'"}'
    payload = {
        "original_b64": base64.b64encode(original).decode(),
        "original_size": len(original),
        "original_truncated": False,
        "key_b64": base64.b64encode(b"k" * 700_000).decode(),
        "topic": "p.agent.messages",
        "partition": 1,
        "offset": 7,
        "error_class": "UndecodableEvent",
        "error_message": "not JSON",
        "consumer": "enforce_policy",
    }
    record = SimpleNamespace(
        value=orjson.dumps({"payload": payload}), timestamp=1_000, partition=0, offset=3
    )
    tail = TopicTail()
    for _ in range(3):
        tail._add("dead_letters", record)
    for item in tail.lists["dead_letters"]:
        kept = item["payload"]
        assert "original_b64" not in kept and "key_b64" not in kept
        assert len(orjson.dumps({k: v for k, v in kept.items() if k != snapshot.KEPT})) < 1000
        assert len(kept[snapshot.KEPT][0]) <= snapshot.KEPT_ORIGINAL_BYTES
    # what the page shows: the redacted text (the search: 65,536 characters of it), cut
    [shown, *_] = snapshot.dead_letters(tail.snapshot(), "p.", preview=65536)
    assert "hunter2" not in shown["original"] and "[REDACTED]" in shown["original"]
    assert shown["original"].endswith("x" * 100) and len(shown["original"]) <= 65536
    assert shown["original_truncated"] and shown["original_size"] > 900_000
    assert shown["topic"] == "agent.messages" and shown["offset"] == 7
    assert tail.dead_letters_seen == 3
