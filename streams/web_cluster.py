"""Web views that answer for the whole cluster, not only this worker's partitions.

A Faust table is split over the workers of the consumer group: each holds the partitions
assigned to it (plus standby copies). So a view that reads its local table answers for a
fraction of the keys. Two helpers make views cluster-wide:

``key_route(table, match_info=...)`` — a view reading ONE key forwards the request to the
worker that actively owns that key's partition (found in the assignor's metadata, the one
Faust's ``/router/`` shows) and returns that worker's answer as is.

``gather(request, local_body, table=...)`` — an aggregate view asks every other worker
owning partitions of its table for their share (``?local=1``), with a short timeout, and
merges; a worker that does not answer is reported (``"partial": true, "missing": [...]``)
instead of silently dropped.

Why not Faust's ``@app.table_route``: it finds a key's partition by hashing the key as the
*changelog* serializes it (JSON, ``b'"agent-1"'``), while our tables keep every key in the
partition of the input record it was folded from — the Kafka default partitioner (murmur2)
on the raw key bytes, as producers of the catalogue topics use it. Hashing the JSON bytes
picks another partition for about half the keys, so ``table_route`` would forward those to
a worker that does not hold them. It also reads the partition count from the *producer's*
metadata, which lacks topics that worker never produced to (faust issue #499). Here the
partition is computed the way the records were partitioned, the count comes from the
consumer's metadata, and forwarded requests carry ``?local=1`` so two workers with a
different view of a rebalance in progress cannot bounce a request back and forth.

Every worker must advertise a URL the others can reach, and its own: Faust's
``canonical_url`` (``AGENTSTREAM_WEB_ADVERTISED_URL``, by default from the bind address).
Two workers advertising the same URL collapse into one entry of the assignment's URL map;
a worker then finds partitions assigned to "its" URL that it does not hold, and answers
503 for them (``unheld``) instead of answering from data it does not have.

Local answers cover only the partitions this worker actively owns (``owned(table)``):
standby copies would otherwise be counted twice in a merge.

Requests to another worker carry the cluster token (secret ``web.cluster_token``, scope
read, accepted by every worker; see `streams.web_auth`), not the caller's token: a
worker never hands a client's credential on. Without a usable cluster token (and with
auth on) nothing is sent: a forwarded lookup answers 503 and an aggregate lists every
other worker as missing, each saying why. A peer refusing the cluster token (401/403)
is reported the same way — the caller's own token was fine.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import wraps
from typing import Any, TypeVar

import httpx
import orjson
from yarl import URL

from agentstream.streams import web_auth
from agentstream.streams.app import app, settings
from agentstream.streams.settings import worker_root
from agentstream.streams.tables import home_partition

log = logging.getLogger(__name__)

#: query parameter asking a worker to answer from its own partitions only (no fan-out,
#: no forwarding)
LOCAL_PARAM = "local"
#: how long a worker waits for another one; a view answers within about this long even
#: when a worker hangs
PEER_TIMEOUT_S = 3.0

V = TypeVar("V", bound=Callable[..., Awaitable[Any]])


def is_local(request: Any) -> bool:
    return str(request.query.get(LOCAL_PARAM, "")).lower() in ("1", "true", "yes")


def key_partition(key: str, partitions: int) -> int:
    """The partition Kafka's default partitioner (murmur2, like Java's) picks for `key`."""
    return home_partition(key, partitions)


def _ident(url: str | URL) -> tuple[str, int]:
    u = URL(str(url))
    return (u.host or "", int(u.port or 80))


def self_url() -> str:
    return str(app.conf.canonical_url).rstrip("/")


def is_self(url: str) -> bool:
    return _ident(url) == _ident(self_url())


def changelog_topic(table: Any) -> str:
    return str(table.changelog_topic.get_topic_name())


def partition_count(table: Any) -> int:
    name = changelog_topic(table)
    try:
        n = app.consumer.topic_partitions(name)
    except Exception:  # consumer not started (no metadata yet)
        n = None
    return int(n or getattr(table, "partitions", None) or settings.topic_partitions)


def peer_root(url: object, *, scheme: str) -> str | None:
    """`url` as the root of another worker's views, ``scheme://host:port``, or None when it
    is not one (`streams.settings.worker_root`). Every member of the consumer group
    advertises its own URL and workers send the cluster token to it; a URL with a path
    and a ``#`` made the view's path a fragment, so a member could have workers fetch any
    page of any address with the token and hand the answer to the caller. (Who may join
    the group is the ACLs' to decide: docs/acls.md.)"""
    return worker_root(url, scheme=scheme)


def _peers(urls: Any) -> dict[str, str]:
    """Advertised URL → its root (`peer_root`), leaving out what is no worker root."""
    scheme = web_auth.web_scheme(settings)
    out: dict[str, str] = {}
    for url in urls:
        root = peer_root(url, scheme=scheme)
        if root is None:
            _refused_peer(str(url))
        else:
            out[str(url)] = root
    return out


_REFUSED: set[str] = set()


def _refused_peer(url: str) -> None:
    if url not in _REFUSED and len(_REFUSED) < 100:
        _REFUSED.add(url)
        log.error("a group member advertises %r, which is no worker URL: never called", url)


def owners(table: Any) -> dict[int, str]:
    """Partition of `table` → URL of the worker actively owning it (assignor metadata)."""
    name = changelog_topic(table)
    meta = app.router.tables_metadata()
    roots = _peers(meta)
    out: dict[int, str] = {}
    for url, topics in meta.items():
        root = roots.get(str(url))
        if root is None:
            continue
        for p in topics.get(name, ()):
            out[int(p)] = root
    return out


def members() -> list[str]:
    """Every worker of the group (its advertised URL, as a root), this one included."""
    urls = set(app.router.tables_metadata()) | set(app.router.external_topics_metadata())
    return sorted(set(_peers(urls).values()) | {self_url()})


def active_partitions(table: Any) -> set[int]:
    name = changelog_topic(table)
    return {tp.partition for tp in app.assignor.assigned_actives() if tp.topic == name}


def owned(table: Any) -> Callable[[str], bool]:
    """A predicate: does this worker actively own the partition of this (raw) key?"""
    actives = active_partitions(table)
    n = partition_count(table)
    return lambda key: key_partition(key, n) in actives


def owned_partition(table: Any) -> Callable[[int], bool]:
    """For tables whose keys carry their partition (``"<partition>|..."``)."""
    actives = active_partitions(table)
    return lambda p: p in actives


def _peer_url(base: str, request: Any) -> str:
    return base + str(request.rel_url.update_query({LOCAL_PARAM: "1"}))


def _peer_client(headers: dict[str, str]) -> httpx.AsyncClient:
    # workers talk to each other directly: a proxy from the environment (HTTP_PROXY)
    # would route loopback and cluster-internal addresses through it
    return httpx.AsyncClient(
        timeout=PEER_TIMEOUT_S,
        trust_env=False,
        headers=headers,
        verify=web_auth.client_verify(settings),
    )


async def _peer_headers() -> dict[str, str]:
    """The cluster token as bearer; `web_auth.PeerAuthError` (with the reason) when this
    worker has none to send and auth is on."""
    return await web_auth.gate(settings).peer_headers()


def _reason(resp: httpx.Response, *fields: str) -> str | None:
    """The first of `fields` a peer's JSON answer gives as text, if any."""
    try:
        body = resp.json()
    except ValueError:
        return None
    if not isinstance(body, dict):
        return None
    return next((v for f in fields if isinstance(v := body.get(f), str) and v), None)


def _refused(resp: httpx.Response) -> str:
    """Why a peer refused this worker's request (401/403), from its JSON answer."""
    reason = _reason(resp, "reason", "error")
    return f"it refused this worker's cluster token: HTTP {resp.status_code}: {reason or '?'}"


def _failed(resp: httpx.Response) -> str:
    """A peer's error answer: its status, and its reason when it gave one (a 503 while it
    restores its tables says so)."""
    reason = _reason(resp, "error")
    return f"HTTP {resp.status_code}: {reason}" if reason else f"HTTP {resp.status_code}"


async def _fetch(http: httpx.AsyncClient, url: str) -> httpx.Response:
    # httpx's timeout bounds each phase; a peer dripping its answer byte by byte could
    # hold the view much longer without a bound on the whole call
    async with asyncio.timeout(PEER_TIMEOUT_S):
        return await http.get(url)


#: the statuses a forwarded answer is passed on with (the views' own)
PASSED_ON = frozenset({200, 400, 404, 503})


async def forward(view: Any, request: Any, owner: str, partition: int) -> Any:
    """The owner's answer to this request (status and body as it gave them)."""

    def unavailable(why: str) -> Any:
        return view.json(
            {
                "error": f"the worker owning partition {partition} {why}",
                "worker": owner,
                "partition": partition,
            },
            status=503,
        )

    try:
        headers = await _peer_headers()
    except web_auth.PeerAuthError as exc:
        return unavailable(f"cannot be asked: {exc}")
    try:
        async with _peer_client(headers) as http:
            resp = await _fetch(http, _peer_url(owner, request))
    except Exception as exc:  # any failure of the peer call is a 503 (not a 500)
        return unavailable(f"did not answer: {type(exc).__name__}: {exc}")
    if resp.status_code in (401, 403):
        return unavailable(_refused(resp))
    content_type = resp.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type != "application/json" or resp.status_code not in PASSED_ON:
        # a worker's views answer JSON with these statuses: anything else (HTML from
        # whatever listens at the advertised URL) is not served from this worker's origin
        return unavailable(f"answered HTTP {resp.status_code} {content_type or '?'}")
    try:
        orjson.loads(resp.content)
    except orjson.JSONDecodeError:
        return unavailable("answered something that is not JSON")
    return view.bytes(resp.content, content_type="application/json", status=resp.status_code)


def is_restoring() -> bool:
    """Whether this worker's tables are being restored: after an assignment, until its
    recovery completes. Meanwhile a key not yet restored reads as unknown, a count as too
    low."""
    recovery = app.tables.recovery
    return bool(getattr(app, "rebalancing", False)) or not recovery.completed.is_set()


RESTORING_ERROR = "this worker's tables are being restored after an assignment; retry"


def restoring(view: Any) -> Any | None:
    """A 503 while this worker's tables are being restored (`is_restoring`): a key not yet
    restored would read as unknown (404), a series as empty. None when the tables are
    whole."""
    if is_restoring():
        return view.json({"error": RESTORING_ERROR}, status=503)
    return None


def local_answer(view: Any, body: Any) -> Any:
    """This worker's part of an aggregate view, asked by the worker gathering it
    (``?local=1``): a 503 while its tables are being restored, which the gatherer lists
    under `missing` (the answer `partial`), rather than counts that are not whole."""
    refused = restoring(view)
    return view.json(body) if refused is None else refused


async def route(view: Any, request: Any, table: Any, key: str) -> Any | None:
    """The owner's answer when another worker owns `key`'s partition of `table`, a 503
    when nobody does right now or this worker, its owner, is still restoring it; None
    when this worker should answer itself."""
    if is_local(request):
        return restoring(view)
    partition = key_partition(key, partition_count(table))
    owner = owners(table).get(partition)
    if owner is None:
        return view.json(
            {
                "error": f"no worker owns partition {partition} of {changelog_topic(table)} "
                "right now (rebalancing?); retry",
                "partition": partition,
            },
            status=503,
        )
    if is_self(owner):
        if partition not in active_partitions(table):
            return view.json(
                {"error": unheld_message(table, [partition]), "partition": partition},
                status=503,
            )
        return restoring(view)
    return await forward(view, request, owner, partition)


def unheld(table: Any, by_partition: dict[int, str]) -> list[int]:
    """Partitions the group's assignment gives to this worker's advertised URL that this
    worker does not actively own. Faust keys the assignment's URL map by URL, so two
    workers advertising the same one (e.g. the default 127.0.0.1 on two hosts) collapse
    into one entry, and the partitions of one of them seem to be the other's. Also true
    for a moment while an assignment changes."""
    actives = active_partitions(table)
    return sorted(p for p, url in by_partition.items() if is_self(url) and p not in actives)


def unheld_message(table: Any, partitions: list[int]) -> str:
    return (
        f"partition(s) {partitions} of {changelog_topic(table)} are assigned to "
        f"{self_url()}, this worker's advertised URL, but this worker does not hold them: "
        "another worker advertises the same URL (give each worker its own "
        "AGENTSTREAM_WEB_ADVERTISED_URL), or a rebalance is in progress; retry"
    )


def key_route(table: Any, *, match_info: str) -> Callable[[V], V]:
    """Decorate a view method reading the key `request.match_info[match_info]` of `table`:
    answered here when this worker owns the key's partition, else by its owner."""

    def decorator(fun: V) -> V:
        @wraps(fun)
        async def handler(view: Any, request: Any, *args: Any, **kwargs: Any) -> Any:
            routed = await route(view, request, table, str(request.match_info[match_info]))
            if routed is not None:
                return routed
            return await fun(view, request, *args, **kwargs)

        return handler  # type: ignore[return-value]

    return decorator


class MalformedShare(ValueError):
    """A worker's share of an aggregate view that is not of the shape the view sends (a
    peer of another version, or a compromised one): the view skips it and reports it."""


def _number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def check_counts(counts: Any, path: str = "") -> None:
    """`counts` is nested counters (``{a: {b: n}}``, numbers at the leaves), else a
    `MalformedShare` naming where it is not."""
    if not isinstance(counts, dict):
        raise MalformedShare(f"{path or 'counts'}: a JSON {type(counts).__name__}, not an object")
    for k, v in counts.items():
        if isinstance(v, dict):
            check_counts(v, f"{path}.{k}" if path else str(k))
        elif not _number(v):
            raise MalformedShare(f"{path}.{k} is {type(v).__name__}, not a number")


def check_rows(rows: Any, what: str, **fields: type | tuple[type, ...]) -> None:
    """`rows` is a list of objects whose `fields` have those types (what a merge sorts
    or indexes by), else a `MalformedShare` naming `what`."""
    if not isinstance(rows, list):
        raise MalformedShare(f"{what}: a JSON {type(rows).__name__}, not a list")
    for row in rows:
        if not isinstance(row, dict):
            raise MalformedShare(f"{what}: a JSON {type(row).__name__} among the rows")
        for name, kind in fields.items():
            v = row.get(name)
            if not isinstance(v, kind) or isinstance(v, bool):
                raise MalformedShare(f"{what}: {name} is {type(v).__name__}")


def add_counts(into: dict[str, Any], counts: dict[str, Any]) -> dict[str, Any]:
    """Add nested counters (``{a: {b: n}}``, any depth) of one worker's answer into `into`:
    each worker counts only the partitions it owns, so the cluster's count is the sum. A
    share that is not counters raises `MalformedShare` before anything is added."""
    check_counts(counts)
    _fits(into, counts)
    _add(into, counts)
    return into


def _fits(into: dict[str, Any], counts: dict[str, Any]) -> None:
    for k, v in counts.items():
        have = into.get(k)
        if isinstance(v, dict) and have is not None and not isinstance(have, dict):
            raise MalformedShare(f"{k}: an object where another worker sent a number")
        if not isinstance(v, dict) and isinstance(have, dict):
            raise MalformedShare(f"{k}: a number where another worker sent an object")
        if isinstance(v, dict) and isinstance(have, dict):
            _fits(have, v)


def _add(into: dict[str, Any], counts: dict[str, Any]) -> None:
    for k, v in counts.items():
        if isinstance(v, dict):
            _add(into.setdefault(k, {}), v)
        else:
            into[k] = into.get(k, 0) + v


@dataclass
class Gathered:
    """The answers of every worker to an aggregate view, this one's first."""

    answers: list[tuple[str, Any]]
    missing: list[dict[str, Any]] = field(default_factory=list)
    #: partitions no worker owns right now (before the first assignment, mid-rebalance)
    unowned: list[int] = field(default_factory=list)
    #: members asked without a table that do not serve the view (they run other agents)
    not_serving: list[str] = field(default_factory=list)
    #: partitions assigned to this worker's URL that it does not hold (see `unheld`)
    unheld: list[int] = field(default_factory=list)
    unheld_reason: str = ""
    #: this worker, when its own answer came from tables still being restored
    restoring: list[str] = field(default_factory=list)

    @property
    def bodies(self) -> list[Any]:
        return [body for _, body in self.answers]

    def shares(self, take: Callable[[Any], object]) -> list[Any]:
        """The answers `take` accepts, `take` applied to each (it raises on one of another
        shape: `MalformedShare`, or a KeyError, TypeError... of reading it). A worker whose
        answer it refuses moves under `missing`, so the view answers partial instead of
        500 (one peer's bad answer would otherwise fail the view for the whole cluster).
        `take` must not change anything before it raises (`add_counts` checks first)."""
        kept: list[tuple[str, Any]] = []
        for url, body in self.answers:
            try:
                if not isinstance(body, dict):
                    raise MalformedShare(f"a JSON {type(body).__name__}, not an object")
                take(body)
            except (MalformedShare, KeyError, TypeError, ValueError, AttributeError) as exc:
                self.missing.append({"worker": url, "error": f"malformed answer: {exc}"})
            else:
                kept.append((url, body))
        self.answers = kept
        return [body for _, body in kept]

    @property
    def partial(self) -> bool:
        return bool(self.missing or self.unowned or self.unheld or self.restoring)

    def meta(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "workers": [url for url, _ in self.answers],
            "partial": self.partial,
            "missing": self.missing,
        }
        if self.unowned:
            out["unowned_partitions"] = self.unowned
        if self.not_serving:
            out["not_serving"] = self.not_serving
        if self.unheld:
            out["unheld_partitions"] = self.unheld
            out["error"] = self.unheld_reason
        if self.restoring:
            out["restoring"] = self.restoring
        return out


async def gather(request: Any, local_body: Any, table: Any | None = None) -> Gathered:
    """This worker's answer plus every other worker's (``?local=1``).

    With `table`, only the workers owning partitions of it are asked — a worker running
    other agents does not serve the view at all; without, every member of the group, and
    one answering 404 is noted as not serving the view rather than missing. A worker whose
    tables are being restored makes the answer `partial`: this one is listed under
    `restoring` (its counts kept, as far as they go), a peer under `missing` (it answers
    503, `local_answer`).
    """
    result = Gathered(answers=[(self_url(), local_body)])
    if table is not None:
        if is_restoring():
            result.restoring.append(self_url())
        by_partition = owners(table)
        peers = sorted({u for u in by_partition.values() if not is_self(u)})
        result.unowned = sorted(set(range(partition_count(table))) - set(by_partition))
        result.unheld = unheld(table, by_partition)
        if result.unheld:
            result.unheld_reason = unheld_message(table, result.unheld)
    else:
        peers = [u for u in members() if not is_self(u)]
    if not peers:
        return result
    try:
        headers = await _peer_headers()
    except web_auth.PeerAuthError as exc:
        result.missing += [{"worker": u, "error": f"not asked: {exc}"} for u in peers]
        return result
    async with _peer_client(headers) as http:
        replies = await asyncio.gather(
            *(_fetch(http, _peer_url(u, request)) for u in peers), return_exceptions=True
        )
    for url, reply in zip(peers, replies, strict=True):
        if isinstance(reply, BaseException):
            result.missing.append({"worker": url, "error": f"{type(reply).__name__}: {reply}"})
        elif reply.status_code in (401, 403):
            result.missing.append({"worker": url, "error": _refused(reply)})
        elif reply.status_code == 404 and table is None:
            result.not_serving.append(url)
        elif reply.status_code != 200:
            result.missing.append({"worker": url, "error": _failed(reply)})
        else:
            try:
                result.answers.append((url, reply.json()))
            except ValueError as exc:
                result.missing.append({"worker": url, "error": f"not JSON: {exc}"})
    return result


async def ask_self(paths: list[str]) -> dict[str, tuple[int, Any]]:
    """This worker's own views `paths` as a client sees them — each an aggregate that
    answers for the whole cluster — asked over HTTP with the cluster token (scope read),
    as a peer would: path → (status, JSON body). Status 0: not asked or no answer, the
    body saying why. For the operator console, which shows what the views show."""
    try:
        headers = await _peer_headers()
    except web_auth.PeerAuthError as exc:
        why = {"error": "not asked", "reason": str(exc)}
        return {p: (0, why) for p in paths}
    base = self_url()
    async with _peer_client(headers) as http:
        replies = await asyncio.gather(
            *(_fetch(http, base + p) for p in paths), return_exceptions=True
        )
    out: dict[str, tuple[int, Any]] = {}
    for path, reply in zip(paths, replies, strict=True):
        if isinstance(reply, BaseException):
            out[path] = (0, {"error": "no answer", "reason": f"{type(reply).__name__}: {reply}"})
            continue
        try:
            out[path] = (reply.status_code, reply.json())
        except ValueError:
            out[path] = (reply.status_code, {"error": "not JSON"})
    return out
