"""The operator console, served by every worker: the page under ``/ui/`` and its data.

Routes
------
``GET /ui/``, ``/ui/console.js``, ``/ui/console.css``  the page: static files of this
    package (``ui/``), the same for everyone and holding no data, so they are public
    (`streams.web_auth.PUBLIC_ASSETS`): a browser's navigation cannot send the
    ``Authorization`` header. Everything the page shows comes from the routes below,
    which need a token like every view.
``GET /ui/api/stream``     the snapshots as server-sent events (``text/event-stream``),
    one frame per `console.INTERVAL_S`; the page reads it with ``fetch()`` so that the
    token travels in the ``Authorization`` header (an ``EventSource`` cannot send one).
``GET /ui/api/snapshot``   the latest snapshot as one JSON document.
``GET /ui/api/deadletters`` dead letters from the tail, filtered (``reason``, ``topic``,
    ``since``/``until`` in epoch ms, ``limit``), with the first 64 KiB of their original
    bytes (redacted: all the tail keeps of them, `streams.console.kept_dead_letter`).
``GET /ui/api/worker``     this worker's own share (counters, latency histograms, lag,
    health, probes); the sampler gathers it from every worker (`streams.web_cluster`).

Cost
----
One `Hub` per worker, started by the first client and stopped `IDLE_S` after the last
one left. While it runs it samples once per interval however many clients listen: it
asks this worker's aggregate views (which ask the other workers, as for any client),
gathers every worker's share, and reads the ends of five topics with one consumer of
its own (no group: it disturbs no assignment and commits nothing). Every client gets
the same encoded frame; a slow one skips frames instead of queueing them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable
from importlib import resources
from types import SimpleNamespace
from typing import Any

import orjson
from aiohttp import web
from faust.web import Request, Response, View
from prometheus_client import REGISTRY
from yarl import URL

from agentstream.agents.health import views as health
from agentstream.agents.health.status import overall
from agentstream.streams import console, web_auth
from agentstream.streams.app import app, settings
from agentstream.streams.kafka_security import new_consumer
from agentstream.streams.topics import (
    AGENT_STATUS,
    LLM_BREAKER,
    PIPELINE_CHECKPOINTS,
    PIPELINE_DEADLETTER,
    SECURITY_DECISIONS,
)
from agentstream.streams.web_cluster import ask_self, gather, self_url

log = logging.getLogger(__name__)
#: the hub stops sampling this long after its last client left
IDLE_S = 60.0
#: how long a one-off request waits for the hub's first snapshot
FIRST_WAIT_S = 20.0
#: console streams one worker serves at once; more are answered 503 (each holds a
#: connection, a frame and the hub's sampling of every worker)
MAX_STREAMS = 32
#: ... and per token: one token (a read one is enough) held every stream, and the other
#: operators got a 503
MAX_STREAMS_PER_TOKEN = 8
#: how long one frame may take to write: a client that stops reading is let go
WRITE_TIMEOUT_S = 15.0


class TooManyStreams(Exception):
    """`MAX_STREAMS` clients are already watching."""


#: topic → (the Tail list it fills, how many records to keep, how many to read back
#: per partition at start)
TAILED = {
    AGENT_STATUS: ("status", 1000, 500),
    SECURITY_DECISIONS: ("decisions", 500, 100),
    PIPELINE_DEADLETTER: ("dead_letters", 1000, 500),
    LLM_BREAKER: ("breakers", 200, 100),
    PIPELINE_CHECKPOINTS: ("checkpoints", 100, 50),
}
ASSETS = {
    "/ui/": ("index.html", "text/html"),
    "/ui/console.js": ("console.js", "text/javascript"),
    "/ui/console.css": ("console.css", "text/css"),
}
#: the page loads nothing but its own files and talks to nothing but this worker
PAGE_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
        "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


class TopicTail:
    """The last records of the `TAILED` topics, every partition, read continuously."""

    def __init__(self) -> None:
        self.lists: dict[str, deque[dict[str, Any]]] = {
            name: deque(maxlen=keep) for name, keep, _ in TAILED.values()
        }
        self.dead_letters_seen = 0
        self.problem = ""
        self._names = {settings.topic(t): spec[0] for t, spec in TAILED.items()}
        self._back = {settings.topic(t): spec[2] for t, spec in TAILED.items()}

    def snapshot(self) -> console.Tail:
        return console.Tail(
            **{name: list(items) for name, items in self.lists.items()},
            dead_letters_seen=self.dead_letters_seen,
        )

    async def run(self) -> None:
        while True:
            try:
                await self._follow()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the broker went away: say so, try again
                self.problem = f"reading the topics' ends: {type(exc).__name__}: {exc}"
                log.warning("console: %s", self.problem)
                await asyncio.sleep(5)

    async def _follow(self) -> None:
        from aiokafka import TopicPartition

        consumer = new_consumer(
            settings,
            "console",
            group_id=None,
            enable_auto_commit=False,
            isolation_level="read_committed",
        )
        await consumer.start()
        try:
            # every topic's metadata (no subscription: the client asks for all), as
            # streams.replay does before it reads partitions
            await consumer._client.force_metadata_update()
            parts = []
            for topic in self._names:
                for p in sorted(consumer.partitions_for_topic(topic) or ()):
                    parts.append(TopicPartition(topic, p))
            if not parts:
                raise RuntimeError("none of the topics exists")
            consumer.assign(parts)
            begin = await consumer.beginning_offsets(parts)
            end = await consumer.end_offsets(parts)
            for tp in parts:
                consumer.seek(tp, max(begin[tp], end[tp] - self._back[tp.topic]))
            self.problem = ""
            while True:
                batches = await consumer.getmany(timeout_ms=1000, max_records=5000)
                for tp, records in batches.items():
                    name = self._names[tp.topic]
                    for rec in records:
                        self._add(name, rec)
        finally:
            with contextlib.suppress(Exception):
                await consumer.stop()

    def _add(self, name: str, rec: Any) -> None:
        try:
            event = orjson.loads(rec.value)
            payload = event["payload"]
        except (orjson.JSONDecodeError, TypeError, KeyError):
            return  # not an event: the topic's own consumers dead-letter it
        if not isinstance(payload, dict):
            return
        if name == "dead_letters":
            self.dead_letters_seen += 1
            payload = console.kept_dead_letter(payload)  # not a megabyte each
        self.lists[name].append(
            {
                "at": rec.timestamp / 1000,
                "partition": rec.partition,
                "offset": rec.offset,
                "payload": payload,
            }
        )


def worker_share() -> dict[str, Any]:
    """This worker's own numbers (``/ui/api/worker?local=1``)."""
    found = list(health.latest)
    return {
        "worker_id": settings.worker_id,
        "url": self_url(),
        "uptime_s": round(time.time() - health.STARTED, 1),
        "status": overall(found) if found else None,
        "components": {c.name: {"status": c.status, "detail": c.detail} for c in found},
        "lag": health.consumer_lags(),
        **console.read_registry(REGISTRY),
        "probes": console.run_probes(),
    }


class Hub:
    """One per worker: samples while clients listen and hands every one the same frame."""

    def __init__(self) -> None:
        self.clients: set[asyncio.Queue[tuple[bytes, bytes]]] = set()
        #: token id -> its open streams, and each stream's token id
        self.owners: dict[str, int] = {}
        self.owner_of: dict[asyncio.Queue[tuple[bytes, bytes]], str] = {}
        self.tail = TopicTail()
        self.history: deque[console.Sample] = deque(
            maxlen=int(console.LATENCY_WINDOW_S / console.INTERVAL_S) + 2
        )
        self.latest: dict[str, Any] | None = None
        #: the latest frame, encoded once per scope: (read, admin)
        self.frames: tuple[bytes, bytes] | None = None
        self._task: asyncio.Task[None] | None = None
        self._tail_task: asyncio.Task[None] | None = None
        self._ready = asyncio.Event()
        self._left_at = time.monotonic()

    def _ensure(self) -> None:
        if self._task is None or self._task.done():
            self._ready = asyncio.Event()
            self._task = asyncio.ensure_future(self._run())

    def subscribe(self, owner: str = "") -> asyncio.Queue[tuple[bytes, bytes]]:
        """A queue of frames for one stream, opened with the token `owner` (its id)."""
        if len(self.clients) >= MAX_STREAMS:
            raise TooManyStreams(f"{MAX_STREAMS} console streams are open on this worker")
        if owner and self.owners.get(owner, 0) >= MAX_STREAMS_PER_TOKEN:
            raise TooManyStreams(
                f"{MAX_STREAMS_PER_TOKEN} console streams are open with this token"
            )
        q: asyncio.Queue[tuple[bytes, bytes]] = asyncio.Queue(maxsize=1)
        self.clients.add(q)
        if owner:
            self.owners[owner] = self.owners.get(owner, 0) + 1
            self.owner_of[q] = owner
        self._ensure()
        if self.frames is not None:
            q.put_nowait(self.frames)
        return q

    def unsubscribe(self, q: asyncio.Queue[tuple[bytes, bytes]]) -> None:
        self.clients.discard(q)
        owner = self.owner_of.pop(q, None)
        if owner is not None:
            left = self.owners.get(owner, 0) - 1
            if left > 0:
                self.owners[owner] = left
            else:
                self.owners.pop(owner, None)
        if not self.clients:
            self._left_at = time.monotonic()

    async def current(self) -> dict[str, Any]:
        """The latest snapshot (admin form), waiting for the first one (at most
        `FIRST_WAIT_S`: TimeoutError)."""
        self._ensure()
        self._left_at = time.monotonic()  # a one-off reader keeps the hub warm too
        async with asyncio.timeout(FIRST_WAIT_S):
            await self._ready.wait()
        assert self.latest is not None
        return self.latest

    async def _run(self) -> None:
        self._tail_task = asyncio.ensure_future(self.tail.run())
        try:
            while self.clients or time.monotonic() - self._left_at < IDLE_S:
                started = time.monotonic()
                try:
                    await self._sample()
                except Exception:  # a bad sample is logged; the next one may do
                    log.exception("console: a snapshot failed")
                await asyncio.sleep(max(0.1, console.INTERVAL_S - (time.monotonic() - started)))
        finally:
            self._tail_task.cancel()
            self.tail = TopicTail()
            self.history.clear()
            self.latest, self.frames = None, None

    async def _sample(self) -> None:
        share = worker_share()
        # the shape of a request to this worker's own share: `gather` asks each peer for
        # the same path with ?local=1
        request = SimpleNamespace(rel_url=URL("/ui/api/worker"))
        workers, views = await asyncio.gather(gather(request, share), ask_self(list(console.VIEWS)))
        now = time.time()
        # a peer's malformed share stays out of the rates; `build` reports it
        usable = console.usable_shares(workers.answers)
        self.history.append(
            console.Sample(
                at=now,
                counters={u: b.get("counters") or {} for u, b in usable},
                latency={u: b.get("latency") or {} for u, b in usable},
            )
        )
        patterns = console.PATTERNS[0]() if console.PATTERNS else None
        doc = console.build(
            now=now,
            self_url=self_url(),
            prefix=settings.topic_prefix,
            workers={
                "answers": workers.answers,
                "missing": workers.missing,
                "not_serving": workers.not_serving,
            },
            views=views,
            tail=self.tail.snapshot(),
            history=list(self.history),
            patterns=patterns,
        )
        if self.tail.problem:
            doc["problems"]["topics"] = self.tail.problem
            doc["partial"] = True
        self.latest = doc
        self.frames = (_frame(console.for_read(doc)), _frame(doc))
        self._ready.set()
        for q in list(self.clients):
            if q.full():  # a slow client gets the newest frame, not a backlog
                with contextlib.suppress(asyncio.QueueEmpty):
                    q.get_nowait()
            q.put_nowait(self.frames)


def _frame(doc: dict[str, Any]) -> bytes:
    return b"event: snapshot\ndata: " + orjson.dumps(doc) + b"\n\n"


hub = Hub()


def _scoped(request: Any) -> Callable[[dict[str, Any]], dict[str, Any]]:
    return (lambda d: d) if web_auth.is_admin(request) else console.for_read


# -- the page --------------------------------------------------------------------------------
def _asset(name: str) -> bytes:
    return resources.files(__package__).joinpath("ui", name).read_bytes()


@app.page("/ui")
class ConsoleRedirect(View):
    async def get(self, request: Request) -> Response:
        raise web.HTTPFound("/ui/")


def _asset_view(path: str) -> None:
    name, content_type = ASSETS[path]

    class Asset(View):
        async def get(self, request: Request) -> Response:
            return self.bytes(_asset(name), content_type=content_type, headers=dict(PAGE_HEADERS))

    Asset.__name__ = Asset.__qualname__ = f"ConsoleAsset_{name.replace('.', '_')}"
    app.page(path)(Asset)


for _path in ASSETS:
    _asset_view(_path)


# -- the data --------------------------------------------------------------------------------
@app.page("/ui/api/worker")
class WorkerShareView(View):
    async def get(self, request: Request) -> Response:
        return self.json(worker_share())


@app.page("/ui/api/snapshot")
class SnapshotView(View):
    async def get(self, request: Request) -> Response:
        try:
            doc = await hub.current()
        except TimeoutError:
            return self.json({"error": "no snapshot yet; retry"}, status=503)
        return self.json(_scoped(request)(doc))


@app.page("/ui/api/deadletters")
class DeadLettersView(View):
    async def get(self, request: Request) -> Response:
        q = request.query
        try:
            since = int(q["since"]) if q.get("since") else None
            until = int(q["until"]) if q.get("until") else None
            limit = min(int(q.get("limit") or 200), 1000)
        except ValueError:
            return self.json(
                {"error": "since and until are epoch milliseconds, limit a number"}, status=400
            )
        try:
            await hub.current()
        except TimeoutError:
            return self.json({"error": "no snapshot yet; retry"}, status=503)
        found = console.dead_letters(
            hub.tail.snapshot(),
            settings.topic_prefix,
            reason=q.get("reason") or None,
            topic=q.get("topic") or None,
            since_ms=since,
            until_ms=until,
            limit=limit,
            preview=65536,
        )
        return self.json({"dead_letters": found, "kept": len(hub.tail.lists["dead_letters"])})


@app.page("/ui/api/stream")
class StreamView(View):
    async def get(self, request: Request) -> Any:
        if request.method == "HEAD":  # the headers only: no stream to hold open
            return self.bytes(b"", content_type="text/event-stream")
        admin = web_auth.is_admin(request)
        authorization = request.headers.getall("Authorization", [])
        route = web_auth.resolved_route(request)
        try:
            queue = hub.subscribe(web_auth.token_id_of(request))
        except TooManyStreams as exc:
            return self.json({"error": "too many streams", "reason": str(exc)}, status=503)
        resp = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-store",
                "X-Accel-Buffering": "no",  # a proxy in front must not hold frames back
            }
        )
        try:
            await resp.prepare(request)
            await resp.write(b"retry: 2000\n\n")
            while True:
                try:
                    async with asyncio.timeout(15):
                        read, full = await queue.get()
                except TimeoutError:
                    frame = b": still here\n\n"  # keeps idle proxies from closing
                else:
                    # the middleware checked the token when the stream opened; a token
                    # revoked since must not keep watching (the gate's own cache: 5 s)
                    decision = await web_auth.gate().check("GET", route, authorization)
                    if not decision.allowed:
                        frame = b"event: end\ndata: token no longer accepted\n\n"
                        async with asyncio.timeout(WRITE_TIMEOUT_S):
                            await resp.write(frame)
                        break
                    frame = full if admin else read
                # a client that stops reading would hold this task and its frame for ever
                async with asyncio.timeout(WRITE_TIMEOUT_S):
                    await resp.write(frame)
        except ConnectionResetError:
            pass  # the client went away
        except TimeoutError:
            # the client stopped reading: returning alone would leave aiohttp waiting to
            # write the end of the response into its full socket buffer, for ever
            if request.transport is not None:
                request.transport.abort()
        finally:
            hub.unsubscribe(queue)
        return resp
