"""streams.web_cluster without a broker: which partition a key lives in, why Faust's
table_route would look elsewhere, and how a gathered answer reports missing workers."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
from aiokafka.partitioner import DefaultPartitioner
from yarl import URL

from agentstream.streams.tables.monitoring import heartbeats_writer
from agentstream.streams.web_cluster import Gathered, _peer_url, is_local, key_partition


def test_key_partition_is_the_producers_default_partitioner() -> None:
    partitioner = DefaultPartitioner()
    for n in (1, 2, 4, 12):
        for key in ("agent-1", "cpu.load", "req-Ω", ""):
            assert key_partition(key, n) == partitioner(key.encode(), list(range(n)), [])


def test_table_route_would_hash_the_json_key_not_the_records_key() -> None:
    # Our tables keep a key in the partition of the record it was folded from (the raw
    # key's hash); Faust's router hashes the changelog's serialized key, which is JSON.
    table = heartbeats_writer().table
    serialized = table.changelog_topic.prepare_key("agent-1", None)[0]
    assert serialized == b'"agent-1"'
    partitioner = DefaultPartitioner()
    misrouted = [
        k
        for k in (f"agent-{i}" for i in range(20))
        if partitioner(table.changelog_topic.prepare_key(k, None)[0], [0, 1, 2, 3], [])
        != key_partition(k, 4)
    ]
    assert misrouted  # table_route would send these to a worker that does not hold them


def test_local_marker() -> None:
    assert is_local(SimpleNamespace(query={"local": "1"}))
    assert is_local(SimpleNamespace(query={"local": "true"}))
    assert not is_local(SimpleNamespace(query={}))
    assert not is_local(SimpleNamespace(query={"local": "0"}))


def test_peer_url_keeps_path_and_query_and_asks_for_the_local_answer() -> None:
    request = SimpleNamespace(rel_url=URL("/comms?kind=token&since=-15m"))
    url = URL(_peer_url("http://10.0.0.2:6066", request))
    assert (url.host, url.port, url.path) == ("10.0.0.2", 6066, "/comms")
    assert dict(url.query) == {"kind": "token", "since": "-15m", "local": "1"}
    escaped = SimpleNamespace(rel_url=URL("/agents/status/a%2Fb"))
    assert _peer_url("http://h:1", escaped) == "http://h:1/agents/status/a%2Fb?local=1"


def test_gathered_reports_what_did_not_answer() -> None:
    whole = Gathered(answers=[("http://a:1", {}), ("http://b:1", {})])
    assert whole.meta() == {
        "workers": ["http://a:1", "http://b:1"],
        "partial": False,
        "missing": [],
    }
    down = Gathered(
        answers=[("http://a:1", {})], missing=[{"worker": "http://b:1", "error": "ConnectError"}]
    )
    assert down.meta()["partial"] is True
    assert down.meta()["missing"] == [{"worker": "http://b:1", "error": "ConnectError"}]
    rebalancing = Gathered(answers=[("http://a:1", {})], unowned=[1])
    assert rebalancing.meta()["partial"] is True
    assert rebalancing.meta()["unowned_partitions"] == [1]


def test_add_counts_sums_nested_counters_of_every_worker() -> None:
    from agentstream.streams.web_cluster import add_counts

    merged: dict[str, object] = {}
    add_counts(merged, {"deny": {"r1": 2, "*": 3}, "allow": {"*": 1}})
    add_counts(merged, {"deny": {"r1": 1, "r2": 4}, "audit": {"*": 5}})
    assert merged == {
        "deny": {"r1": 3, "*": 3, "r2": 4},
        "allow": {"*": 1},
        "audit": {"*": 5},
    }


@pytest.mark.parametrize(
    "advertised",
    [
        "http://169.254.169.254/latest/meta-data/iam/security-credentials/role#",
        "http://10.0.0.5:8080/admin?x=",
        "http://user:pw@10.0.0.5:6066",
        "ftp://10.0.0.5:6066",
        "https://10.0.0.5:6066",  # another scheme than the workers' own (http here)
        "not a url",
    ],
)
def test_an_advertised_url_that_is_no_worker_root_is_never_called(advertised: str) -> None:
    # A member of the consumer group advertises its own URL, and workers send the cluster
    # token to it; a path, query or fragment made them fetch another address's page with
    # it (the appended view path became a fragment) and hand the answer to the caller.
    from agentstream.streams.web_cluster import peer_root

    assert peer_root(advertised, scheme="http") is None


def test_a_worker_root_is_kept_as_scheme_host_and_port() -> None:
    from agentstream.streams.web_cluster import peer_root

    assert peer_root("http://w1.internal:6066/", scheme="http") == "http://w1.internal:6066"
    assert peer_root("https://[::1]:6066", scheme="https") == "https://[::1]:6066"


async def test_a_key_view_answers_503_while_the_tables_are_restored(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # a key not yet restored read as "unknown agent" (404), a series as an empty list
    import asyncio

    from agentstream.streams import web_cluster

    completed = asyncio.Event()
    fake = SimpleNamespace(
        rebalancing=False, tables=SimpleNamespace(recovery=SimpleNamespace(completed=completed))
    )
    monkeypatch.setattr(web_cluster, "app", fake)

    class View:
        def json(self, body: dict, status: int = 200) -> tuple[int, dict]:
            return status, body

    local = SimpleNamespace(query={"local": "1"})  # forwarded here by another worker
    status, body = await web_cluster.route(View(), local, None, "agent-1")
    assert status == 503 and "being restored" in body["error"]
    completed.set()
    assert await web_cluster.route(View(), local, None, "agent-1") is None
    fake.rebalancing = True
    assert (await web_cluster.route(View(), local, None, "agent-1"))[0] == 503


def _restoring_app(monkeypatch: pytest.MonkeyPatch) -> tuple[SimpleNamespace, Any]:
    """web_cluster's `app` as a lone worker whose tables are being restored; set its
    `completed` to end the restore."""
    import asyncio

    from agentstream.streams import web_cluster

    completed = asyncio.Event()
    router = SimpleNamespace(tables_metadata=dict, external_topics_metadata=dict)
    fake = SimpleNamespace(
        rebalancing=False,
        tables=SimpleNamespace(recovery=SimpleNamespace(completed=completed)),
        conf=SimpleNamespace(canonical_url="http://w1:6066"),
        router=router,
        assignor=SimpleNamespace(assigned_actives=set),
        consumer=SimpleNamespace(topic_partitions=lambda name: 2),
    )
    monkeypatch.setattr(web_cluster, "app", fake)
    return fake, completed


class _Table:
    partitions = 2
    changelog_topic = SimpleNamespace(get_topic_name=lambda: "app-counts-changelog")


async def test_an_aggregate_view_says_partial_while_this_worker_restores(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # its counts came from tables half restored: summed as they were and called whole
    from agentstream.streams import web_cluster

    fake, completed = _restoring_app(monkeypatch)
    request = SimpleNamespace(query={})
    got = await web_cluster.gather(request, {"n": 1}, _Table())
    assert got.partial and got.meta()["restoring"] == ["http://w1:6066"]
    assert got.bodies == [{"n": 1}]  # kept, as far as it goes
    completed.set()
    got = await web_cluster.gather(request, {"n": 1}, _Table())
    assert "restoring" not in got.meta() and got.restoring == []
    fake.rebalancing = True
    assert (await web_cluster.gather(request, {"n": 1}, _Table())).restoring


async def test_a_worker_asked_for_its_part_answers_503_while_it_restores(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # the gathering worker lists a 503 under `missing`: the answer is partial
    from agentstream.streams import web_cluster

    _fake, completed = _restoring_app(monkeypatch)

    class View:
        def json(self, body: dict, status: int = 200) -> tuple[int, dict]:
            return status, body

    status, body = web_cluster.local_answer(View(), {"n": 1})
    assert status == 503 and body["error"] == web_cluster.RESTORING_ERROR
    completed.set()
    assert web_cluster.local_answer(View(), {"n": 1}) == (200, {"n": 1})


def test_a_peer_error_is_listed_with_its_reason() -> None:
    import httpx

    from agentstream.streams import web_cluster

    restoring = httpx.Response(503, json={"error": web_cluster.RESTORING_ERROR})
    assert web_cluster._failed(restoring) == f"HTTP 503: {web_cluster.RESTORING_ERROR}"
    assert web_cluster._failed(httpx.Response(502, text="<html>")) == "HTTP 502"
    refused = httpx.Response(403, json={"error": "forbidden", "reason": "scope read"})
    assert web_cluster._refused(refused).endswith("HTTP 403: scope read")
    assert web_cluster._refused(httpx.Response(401, text="no")).endswith("HTTP 401: ?")


@pytest.mark.parametrize(
    ("status", "content_type", "body", "passed"),
    [
        (200, "application/json", b'{"agent_id": "x"}', True),
        (404, "application/json; charset=utf-8", b'{"error": "unknown agent"}', True),
        (200, "text/html", b"<script>alert(document.domain)</script>", False),
        (200, "application/json", b"<script>alert(1)</script>", False),
        (302, "application/json", b"{}", False),
    ],
)
async def test_a_forwarded_answer_is_passed_on_only_as_a_views_json(
    monkeypatch: pytest.MonkeyPatch, status: int, content_type: str, body: bytes, passed: bool
) -> None:
    # whatever listens at a member's advertised URL answered HTML, served from this
    # worker's origin (the console's) with its own content type
    import httpx

    from agentstream.streams import web_cluster

    def peer(request: httpx.Request) -> httpx.Response:
        return httpx.Response(status, headers={"content-type": content_type}, content=body)

    async def headers() -> dict[str, str]:
        return {"Authorization": "Bearer cluster"}

    monkeypatch.setattr(web_cluster, "_peer_headers", headers)
    monkeypatch.setattr(
        web_cluster,
        "_peer_client",
        lambda h: httpx.AsyncClient(headers=h, transport=httpx.MockTransport(peer)),
    )

    class View:
        def json(self, value: dict, status: int = 200) -> tuple[int, str, bytes]:
            return status, "application/json", str(value).encode()

        def bytes(self, value: bytes, content_type: str, status: int) -> tuple[int, str, bytes]:
            return status, content_type, value

    request = SimpleNamespace(rel_url=URL("/agents/status/x"))
    got = await web_cluster.forward(View(), request, "http://peer.example:80", 3)
    if passed:
        assert got == (status, "application/json", body)
    else:
        assert got[0] == 503 and got[1] == "application/json" and b"<script>" not in got[2]


async def test_every_response_is_neither_sniffed_nor_framed() -> None:
    from aiohttp import web

    from agentstream.streams.web_auth import secure_headers

    plain = web.json_response({"a": 1})
    await secure_headers(None, plain)
    assert plain.headers["X-Content-Type-Options"] == "nosniff"
    assert plain.headers["Content-Security-Policy"] == "default-src 'none'; frame-ancestors 'none'"
    page = web.Response(text="<html>", headers={"Content-Security-Policy": "default-src 'self'"})
    await secure_headers(None, page)
    assert page.headers["Content-Security-Policy"] == "default-src 'self'"  # its own kept


def test_a_malformed_share_is_skipped_and_reported_not_a_500() -> None:
    from agentstream.streams.web_cluster import MalformedShare, add_counts

    merged: dict[str, object] = {"deny": {"r1": 1}}
    for bad in ({"deny": {"r1": "x"}}, {"deny": [1]}, {"deny": {"r1": True}}, [1], {"a": None}):
        with pytest.raises(MalformedShare):
            add_counts(merged, bad)  # type: ignore[arg-type]
    assert merged == {"deny": {"r1": 1}}  # nothing of a refused share was added
    got = Gathered(answers=[("http://w1", {"counts": {"a": 1}}), ("http://w2", {"counts": 7})])
    got.answers.append(("http://w3", ["not", "an", "object"]))
    counts: dict[str, object] = {}
    for body in got.shares(lambda b: add_counts(counts, b["counts"])):
        assert body == {"counts": {"a": 1}}
    assert counts == {"a": 1}
    assert got.partial and [m["worker"] for m in got.missing] == ["http://w2", "http://w3"]
    assert all("malformed answer" in m["error"] for m in got.missing)
    assert got.meta()["workers"] == ["http://w1"]
