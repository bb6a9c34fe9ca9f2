"""The console's stream hub: a bound on streams per worker and per token. One token (a
read one is enough) held all of a worker's streams, and every other operator got a 503."""

from __future__ import annotations

import pytest

from agentstream.agents.health import console
from agentstream.agents.health.console import Hub, TooManyStreams


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
