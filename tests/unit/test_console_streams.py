"""The console's live stream (`/ui/api/stream`) holds a connection and a frame per
client: a worker serves a bounded number of them, the rest get a 503."""

from __future__ import annotations

import asyncio

import pytest

from agentstream.agents.health import console as ui


async def test_streams_past_the_limit_are_refused_before_anything_starts() -> None:
    hub = ui.Hub()
    hub.clients.update(asyncio.Queue() for _ in range(ui.MAX_STREAMS))
    with pytest.raises(ui.TooManyStreams, match=str(ui.MAX_STREAMS)):
        hub.subscribe()
    assert hub._task is None  # refused before the hub starts sampling for it
    assert len(hub.clients) == ui.MAX_STREAMS
