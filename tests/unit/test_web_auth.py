"""streams.web_auth without a worker: tokens and the index, the decision for a request,
the TTL that makes a revoke take effect, failing closed — and the ways around it an
attacker would try, against the real middleware on a real aiohttp server (raw requests,
so that no client normalises the path first)."""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from agentstream.streams import web_auth
from agentstream.streams.errors import CredentialsError
from agentstream.streams.settings import Settings, SettingsError
from agentstream.streams.web_auth import (
    CLUSTER_ENTRY,
    INDEX_ENTRY,
    Decision,
    Gate,
    PeerAuthError,
    Snapshot,
    TokenCache,
    TokenIndex,
    TokenIndexError,
    bearer,
    decide,
    load_snapshot,
    snapshot_of,
)
from tests import tls_files

NOW = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
CLUSTER_VALUE = "c" * 43


def index_with(*scopes: str) -> tuple[TokenIndex, list[str]]:
    index, values = TokenIndex(), []
    for n, scope in enumerate(scopes):
        index, value, _ = index.with_new(scope, f"holder-{n}", now=NOW)
        values.append(value)
    return index, values


def snap(index: TokenIndex | None, cluster: str | None = None, **kw: Any) -> Snapshot:
    return snapshot_of(None if index is None else index.dumps(), cluster, **kw)


def auth(value: str) -> list[str]:
    return [f"Bearer {value}"]


# -- tokens and the index ---------------------------------------------------------------------
def test_a_new_token_is_random_prefixed_and_only_its_hash_is_stored() -> None:
    index, value, record = TokenIndex().with_new("read", "grafana", now=NOW)
    assert value.startswith("ast_") and len(value) == 4 + 43
    assert record.sha256 == hashlib.sha256(value.encode()).hexdigest()
    stored = index.dumps()
    assert value not in stored and value[4:] not in stored
    assert json.loads(stored)["tokens"] == [
        {
            "id": record.id,
            "name": "grafana",
            "scope": "read",
            "created": "2026-01-02T03:04:05Z",
            "sha256": record.sha256,
        }
    ]
    _, other, _ = index.with_new("read", "grafana", now=NOW)
    assert other != value
    assert "sha256" not in record.listing() and value not in json.dumps(record.listing())


def test_index_round_trip_and_revoke() -> None:
    index, values = index_with("read", "admin")
    again = TokenIndex.parse(index.dumps())
    assert again == index
    assert again.find(values[1]) == index.tokens[1]
    assert again.find("ast_" + "x" * 43) is None
    smaller, gone = again.without(index.tokens[0].id)
    assert gone == index.tokens[0] and smaller.find(values[0]) is None
    with pytest.raises(KeyError):
        smaller.without("nosuchid")


@pytest.mark.parametrize("name", ["", " padded", "a" * 65, "line\nbreak", "nul\x00"], ids=repr)
def test_bad_names_are_refused(name: str) -> None:
    with pytest.raises(ValueError):
        TokenIndex().with_new("read", name)


def test_unknown_scope_is_refused() -> None:
    with pytest.raises(ValueError, match="scope"):
        TokenIndex().with_new("root", "x")


GOOD = {"id": "ab12cd34", "name": "n", "scope": "read", "created": "x", "sha256": "0" * 64}


@pytest.mark.parametrize(
    ("doc", "problem"),
    [
        ("{not json", "not JSON"),
        ("[]", "not a token index"),
        (json.dumps({"format": "other", "version": 1, "tokens": []}), "not a token index"),
        (json.dumps({"format": "agentstream-web-tokens", "version": 2, "tokens": []}), "version"),
        (json.dumps({"format": "agentstream-web-tokens", "version": 1, "tokens": {}}), "list"),
        (json.dumps({"format": "agentstream-web-tokens", "version": 1}), "list"),
    ],
)
def test_index_document_errors(doc: str, problem: str) -> None:
    with pytest.raises(TokenIndexError, match=problem):
        TokenIndex.parse(doc)


@pytest.mark.parametrize(
    ("entry", "problem"),
    [
        ("nope", "not an object"),
        ({k: v for k, v in GOOD.items() if k != "scope"}, "lacks scope"),
        ({**GOOD, "scope": "root"}, "scope must be"),
        ({**GOOD, "scope": "ADMIN"}, "scope must be"),
        ({**GOOD, "sha256": "0" * 63}, "sha256"),
        ({**GOOD, "sha256": "A" * 64}, "sha256"),
        ({**GOOD, "id": "../x"}, "id must be"),
        ({**GOOD, "name": 7}, "string"),
        ({**GOOD, "name": ""}, "name"),
    ],
)
def test_a_bad_entry_makes_the_whole_index_invalid(entry: Any, problem: str) -> None:
    # one bad entry is not skipped: the operator finds out at once, nothing is half-read
    doc = {"format": "agentstream-web-tokens", "version": 1, "tokens": [GOOD, entry]}
    with pytest.raises(TokenIndexError, match=problem):
        TokenIndex.parse(json.dumps(doc))


def test_duplicates_make_the_index_invalid() -> None:
    base = {"format": "agentstream-web-tokens", "version": 1}
    with pytest.raises(TokenIndexError, match="same id"):
        TokenIndex.parse(json.dumps({**base, "tokens": [GOOD, {**GOOD, "sha256": "1" * 64}]}))
    with pytest.raises(TokenIndexError, match="same hash"):
        TokenIndex.parse(json.dumps({**base, "tokens": [GOOD, {**GOOD, "id": "ffff0000"}]}))


def test_index_errors_never_quote_the_document() -> None:
    secret_ish = "ast_" + "s" * 43
    with pytest.raises(TokenIndexError) as err:
        TokenIndex.parse('{"tokens": "' + secret_ish)
    assert secret_ish not in str(err.value)


def test_find_compares_every_entry_in_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    index, values = index_with("read", "read", "admin", "read")
    calls: list[tuple[bytes, bytes]] = []
    real = web_auth.hmac.compare_digest

    def counting(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(web_auth.hmac, "compare_digest", counting)
    for value in (values[0], values[3], "ast_unknown"):
        calls.clear()
        index.find(value)
        # every stored hash, whichever matched (no early exit), and through compare_digest
        assert len(calls) == 4
        assert {b for _, b in calls} == {t.sha256.encode() for t in index.tokens}


# -- the Authorization header ------------------------------------------------------------------
@pytest.mark.parametrize(
    "headers",
    [
        [],
        ["Basic dXNlcjpwYXNz"],
        ["Token ast_abc"],
        ["Bearer"],
        ["Bearer "],
        ["Bearer a b"],
        ["Bearer ast_abc\x00"],
        ["Bearer " + "a" * 513],
        ["Bearer ast_abc", "Bearer ast_def"],
        ["Bearerast_abc"],
    ],
    ids=repr,
)
def test_malformed_authorization_is_401(headers: list[str]) -> None:
    got = bearer(headers)
    assert isinstance(got, Decision) and got.status == 401
    assert got.headers["WWW-Authenticate"].startswith("Bearer")


@pytest.mark.parametrize("scheme", ["Bearer", "bearer", "BEARER", "bEaReR"])
def test_the_scheme_is_case_insensitive(scheme: str) -> None:
    assert bearer([f"{scheme} ast_abc"]) == "ast_abc"


# -- the decision ------------------------------------------------------------------------------
def test_read_and_admin_scopes() -> None:
    index, (read, admin) = index_with("read", "admin")
    s = snap(index)

    def d(method: str, route: str | None, headers: list[str]) -> Decision:
        return decide(method, route, headers, s, ready_public=True)

    assert d("GET", "/comms", auth(read)).allowed
    assert d("GET", "/comms", auth(read)).scope == "read"
    post = d("POST", "/checkpoints", auth(read))
    assert post.status == 403 and "needs scope admin" in post.reason
    assert post.body() == {"error": "forbidden", "reason": post.reason}
    assert d("POST", "/checkpoints", auth(admin)).scope == "admin"
    # HEAD is GET without the body (load-balancer probes send it): the read scope
    assert d("HEAD", "/comms", auth(read)).allowed
    for method in ("OPTIONS", "PUT", "DELETE", "PATCH", "TRACE"):
        assert d(method, "/comms", auth(read)).status == 403, method
        assert d(method, "/comms", auth(admin)).allowed, method
    # a lower-case method is the same method
    assert d("post", "/checkpoints", auth(read)).status == 403


def test_missing_unknown_and_revoked_tokens_are_401() -> None:
    index, (read,) = index_with("read")
    s = snap(index)
    none = decide("GET", "/comms", [], s, ready_public=True)
    assert none.status == 401 and none.headers == {"WWW-Authenticate": 'Bearer realm="agentstream"'}
    assert none.body()["error"] == "authentication required"
    unknown = decide("GET", "/comms", auth("ast_" + "z" * 43), s, ready_public=True)
    assert unknown.status == 401 and "invalid_token" in unknown.headers["WWW-Authenticate"]
    revoked = snap(index.without(index.tokens[0].id)[0])
    assert decide("GET", "/comms", auth(read), revoked, ready_public=True).status == 401


@pytest.mark.parametrize(
    ("method", "route", "ready_public", "public"),
    [
        ("GET", "/health", True, True),
        ("GET", "/health", False, True),
        ("GET", "/ready", True, True),
        ("GET", "/ready", False, False),
        ("POST", "/health", True, False),
        ("HEAD", "/health", True, True),
        ("HEAD", "/ready", False, False),
        ("OPTIONS", "/ready", True, False),
        # nothing resolved (a 404 or 405): not public, whatever the path looked like
        ("GET", None, True, False),
        ("GET", "/health/", True, False),
        ("GET", "/metrics", True, False),
        ("GET", "/", True, False),
        # the console's static files are public; its data is not
        ("GET", "/ui/", False, True),
        ("GET", "/ui/console.js", False, True),
        ("POST", "/ui/", True, False),
        ("GET", "/ui/api/stream", True, False),
        ("GET", "/ui/api/snapshot", True, False),
    ],
)
def test_public_routes(method: str, route: str | None, ready_public: bool, public: bool) -> None:
    got = decide(method, route, [], Snapshot(), ready_public=ready_public)
    assert got.allowed is public
    assert got.scope is None


def test_fails_closed_without_a_usable_index() -> None:
    _, (value,) = index_with("read")
    missing = decide("GET", "/comms", auth(value), Snapshot(), ready_public=True)
    assert missing.status == 401 and "no web tokens exist" in missing.reason
    broken = snap(None, index_read_error=f"cannot read secret {INDEX_ENTRY}: boom")
    unreadable = decide("GET", "/comms", auth(value), broken, ready_public=True)
    assert unreadable.status == 503 and "cannot be read" in unreadable.reason
    assert "boom" not in unreadable.reason  # the cause is the log's
    invalid = snapshot_of("{not json", None)
    assert invalid.index is None and "not valid" in invalid.index_error
    assert decide("GET", "/comms", auth(value), invalid, ready_public=True).status == 503
    # no token at all is still a 401 (the client's problem first)
    assert decide("GET", "/comms", [], invalid, ready_public=True).status == 401


def test_the_cluster_token_is_read_scope() -> None:
    index, _ = index_with("admin")
    s = snap(index, CLUSTER_VALUE)
    ok = decide("GET", "/agents/status/{agent_id}", auth(CLUSTER_VALUE), s, ready_public=True)
    assert ok.allowed and ok.scope == "read" and ok.token_id == "cluster"
    assert decide("POST", "/checkpoints", auth(CLUSTER_VALUE), s, ready_public=True).status == 403
    # accepted even when the index is missing: forwarded lookups do not need it
    assert decide(
        "GET", "/comms", auth(CLUSTER_VALUE), snap(None, CLUSTER_VALUE), ready_public=True
    ).allowed


@pytest.mark.parametrize(
    ("value", "problem"),
    [(None, "no cluster token"), ("short", "shorter than"), ("x" * 40 + " y", "characters")],
)
def test_an_unusable_cluster_token_is_not_accepted(value: str | None, problem: str) -> None:
    s = snapshot_of(None, value)
    assert s.cluster is None and problem in web_auth.cluster_problem(s)
    if value:
        assert decide("GET", "/comms", auth(value), s, ready_public=True).status == 401


def test_the_cluster_token_never_shows_in_a_repr() -> None:
    s = snapshot_of(None, CLUSTER_VALUE)
    assert CLUSTER_VALUE not in repr(s) and CLUSTER_VALUE not in str(s)


# -- the TTL -----------------------------------------------------------------------------------
class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_a_revoke_takes_effect_after_the_ttl_not_before() -> None:
    index, (value,) = index_with("read")
    current = {"snap": snap(index)}
    loads = 0

    async def load() -> Snapshot:
        nonlocal loads
        loads += 1
        return current["snap"]

    clock = Clock()
    cache = TokenCache(load, ttl=5, clock=clock)

    async def allowed() -> bool:
        return decide("GET", "/comms", auth(value), await cache.get(), ready_public=True).allowed

    assert await allowed() and loads == 1
    current["snap"] = snap(index.without(index.tokens[0].id)[0])  # revoked in the store
    clock.now += 4.9
    assert await allowed() and loads == 1  # served from the last read
    clock.now += 0.2
    assert not await allowed() and loads == 2


async def test_concurrent_requests_share_one_read() -> None:
    started = asyncio.Event()
    release = asyncio.Event()
    loads = 0

    async def load() -> Snapshot:
        nonlocal loads
        loads += 1
        started.set()
        await release.wait()
        return Snapshot()

    cache = TokenCache(load, ttl=5, clock=Clock())
    tasks = [asyncio.create_task(cache.get()) for _ in range(5)]
    await started.wait()
    release.set()
    await asyncio.gather(*tasks)
    assert loads == 1


class FakeProvider:
    def __init__(self, entries: dict[str, str] | None = None, fail: bool = False) -> None:
        self.entries = dict(entries or {})
        self.fail = fail

    async def get_secret(self, name: str) -> str | None:
        if self.fail:
            raise CredentialsError("keychain secretservice failed: DBusError")
        return self.entries.get(name)

    async def set_secret(self, name: str, value: str) -> None:
        self.entries[name] = value

    async def update_secret(self, name: str, value: str) -> str:
        self.entries[name] = value
        return "fake"


async def test_a_failing_credentials_chain_fails_closed() -> None:
    s = await load_snapshot(FakeProvider(fail=True))
    assert "cannot read secret web.tokens" in s.index_error
    assert "cannot read secret web.cluster_token" in s.cluster_error
    got = decide("GET", "/comms", auth("ast_" + "a" * 43), s, ready_public=True)
    # the cause (DBusError, backend names, paths) goes to the log, not to the caller
    assert got.status == 503 and "DBusError" in s.index_error
    assert "DBusError" not in got.reason and "the worker's log says why" in got.reason


async def test_create_revoke_through_a_provider() -> None:
    provider = FakeProvider()
    value, record = await web_auth.create_token(provider, "admin", "ops")
    assert value not in provider.entries[INDEX_ENTRY]
    s = await load_snapshot(provider)
    assert decide("POST", "/checkpoints", auth(value), s, ready_public=True).allowed
    await web_auth.revoke_token(provider, record.id)
    s = await load_snapshot(provider)
    assert decide("POST", "/checkpoints", auth(value), s, ready_public=True).status == 401
    # an invalid index is never overwritten by a create
    provider.entries[INDEX_ENTRY] = "{broken"
    with pytest.raises(TokenIndexError):
        await web_auth.create_token(provider, "read", "x")
    assert provider.entries[INDEX_ENTRY] == "{broken"
    await web_auth.rotate_cluster_token(provider)
    assert provider.entries[CLUSTER_ENTRY].startswith("ast_")


# -- the gate ----------------------------------------------------------------------------------
def settings(**env: str) -> Settings:
    return Settings.from_env({f"AGENTSTREAM_{k.upper()}": v for k, v in env.items()})


def gate_with(load: Callable[[], Awaitable[Snapshot]], **env: str) -> Gate:
    return Gate(settings(**env), TokenCache(load, clock=Clock()))


async def test_gate_off_grants_admin_and_public_routes_read_no_secret() -> None:
    async def broken() -> Snapshot:
        raise AssertionError("the index must not be read")

    off = gate_with(broken, web_auth="off")
    assert (await off.check("POST", "/checkpoints", [])).scope == "admin"
    on = gate_with(broken)
    assert (await on.check("GET", "/health", [])).allowed
    assert (await on.check("GET", "/ready", [])).allowed
    closed = gate_with(broken, web_ready_public="false")
    with pytest.raises(AssertionError, match="must not be read"):
        await closed.check("GET", "/ready", [])


async def test_peer_headers() -> None:
    async def with_cluster() -> Snapshot:
        return snapshot_of(None, CLUSTER_VALUE)

    async def without() -> Snapshot:
        return snapshot_of(None, None)

    assert await gate_with(with_cluster).peer_headers() == {
        "Authorization": f"Bearer {CLUSTER_VALUE}"
    }
    with pytest.raises(PeerAuthError, match="no cluster token"):
        await gate_with(without).peer_headers()
    assert await gate_with(without, web_auth="off").peer_headers() == {}


def test_server_tls_context(tmp_path: Any) -> None:
    assert web_auth.server_ssl_context(settings()) is None
    assert web_auth.web_scheme(settings()) == "http"
    # a missing or unreadable certificate stops the worker (one settings line), never
    # plain HTTP
    with pytest.raises(SettingsError, match=r"WEB_TLS_CERTFILE/KEYFILE: .*No such file"):
        web_auth.server_ssl_context(
            settings(web_tls_certfile=str(tmp_path / "c.pem"), web_tls_keyfile=str(tmp_path / "k"))
        )
    (tmp_path / "c.pem").write_text("not a certificate\n")
    (tmp_path / "k").write_text("not a key\n")
    with pytest.raises(SettingsError, match=r"\(\[SSL\] PEM lib\): both must be PEM files"):
        web_auth.server_ssl_context(
            settings(web_tls_certfile=str(tmp_path / "c.pem"), web_tls_keyfile=str(tmp_path / "k"))
        )


# -- the middleware, attacked ------------------------------------------------------------------
SECRET = "SECRET-BODY"


@pytest.fixture
async def server() -> AsyncIterator[tuple[TestServer, dict[str, str]]]:
    """An aiohttp app with our route shapes (Faust registers views the same way: one
    route per method, HEAD included) behind the real middleware, and an index with a
    read and an admin token."""
    index, (read, admin) = index_with("read", "admin")

    async def load() -> Snapshot:
        return snap(index, CLUSTER_VALUE)

    async def protected(request: web.Request) -> web.Response:
        return web.json_response({"secret": SECRET, "scope": web_auth.scope_of(request)})

    async def health(request: web.Request) -> web.Response:
        return web.json_response({"status": "alive"})

    app = web.Application()
    for method, path, handler in [
        ("GET", "/health", health),
        ("GET", "/ready", health),
        ("GET", "/", protected),
        ("GET", "/security/policies/", protected),
        ("GET", "/agents/status/{agent_id}", protected),
        ("GET", "/checkpoints", protected),
        ("POST", "/checkpoints", protected),
    ]:
        app.router.add_route(method, path, handler)
        if method == "GET":  # Faust adds HEAD to every view, answered by its get()
            app.router.add_route("HEAD", path, handler)
    app.middlewares.insert(0, web_auth.middleware(Gate(settings(), TokenCache(load))))
    srv = TestServer(app)
    await srv.start_server()
    try:
        yield srv, {"read": read, "admin": admin}
    finally:
        await srv.close()


async def raw(srv: TestServer, request_line: str, *headers: str) -> tuple[int, str]:
    """One HTTP/1.1 request written byte for byte: no client library normalises it."""
    reader, writer = await asyncio.open_connection(srv.host, srv.port)
    head = "\r\n".join([request_line, f"Host: {srv.host}", *headers, "Connection: close"])
    writer.write((head + "\r\n\r\n").encode("latin-1"))
    await writer.drain()
    data = await reader.read()
    writer.close()
    status_line, _, rest = data.decode("latin-1").partition("\r\n")
    return int(status_line.split()[1]), rest


async def test_the_server_answers_with_a_token(server: tuple[TestServer, dict[str, str]]) -> None:
    srv, tokens = server
    status, body = await raw(
        srv, "GET /security/policies/ HTTP/1.1", f"Authorization: Bearer {tokens['read']}"
    )
    assert status == 200 and SECRET in body and '"scope": "read"' in body
    status, body = await raw(
        srv,
        "POST /checkpoints HTTP/1.1",
        f"Authorization: Bearer {tokens['admin']}",
        "Content-Length: 0",
    )
    assert status == 200 and '"scope": "admin"' in body
    status, body = await raw(
        srv,
        "POST /checkpoints HTTP/1.1",
        f"Authorization: Bearer {tokens['read']}",
        "Content-Length: 0",
    )
    assert status == 403 and SECRET not in body
    assert json.loads(body.split("\r\n\r\n", 1)[1])["error"] == "forbidden"
    status, body = await raw(srv, "GET /health HTTP/1.1")
    assert status == 200 and "alive" in body
    # a load balancer's HEAD probe: the status without a token, and no body
    status, body = await raw(srv, "HEAD /health HTTP/1.1")
    assert status == 200 and "alive" not in body
    status, body = await raw(
        srv, "HEAD /checkpoints HTTP/1.1", f"Authorization: Bearer {tokens['read']}"
    )
    assert status == 200 and SECRET not in body


ATTACKS = [
    "GET /security/policies/ HTTP/1.1",
    "GET //security/policies/ HTTP/1.1",
    "GET /security/policies HTTP/1.1",
    "GET /security//policies/ HTTP/1.1",
    "GET /health/../security/policies/ HTTP/1.1",
    "GET /health/%2e%2e/security/policies/ HTTP/1.1",
    "GET /health%2F..%2Fsecurity%2Fpolicies%2F HTTP/1.1",
    "GET /%2Fsecurity/policies/ HTTP/1.1",
    "GET /security%2Fpolicies/ HTTP/1.1",
    "GET /%73ecurity/policies/ HTTP/1.1",
    "GET /SECURITY/POLICIES/ HTTP/1.1",
    "GET /security/policies/?token=ast_x&access_token=ast_x HTTP/1.1",
    "GET /security/policies/;health HTTP/1.1",
    "GET /security/policies/#/health HTTP/1.1",
    "GET /agents/status/..%2F..%2Fhealth HTTP/1.1",
    "GET /agents/status/%2e%2e HTTP/1.1",
    "GET http://evil/security/policies/ HTTP/1.1",
    "GET http://127.0.0.1/health/../security/policies/ HTTP/1.1",
    "GET / HTTP/1.1",
    "GET /checkpoints HTTP/1.1",
    "POST /checkpoints HTTP/1.1",
    "POST /health HTTP/1.1",
    "HEAD /security/policies/ HTTP/1.1",
    "HEAD /health/../security/policies/ HTTP/1.1",
    "OPTIONS /security/policies/ HTTP/1.1",
    "OPTIONS * HTTP/1.1",
    "PUT /security/policies/ HTTP/1.1",
    "DELETE /checkpoints HTTP/1.1",
    "GET /nonexistent HTTP/1.1",
    "GET /security/policies/ HTTP/1.0",
]


@pytest.mark.parametrize("request_line", ATTACKS)
async def test_no_way_around_the_token(
    server: tuple[TestServer, dict[str, str]], request_line: str
) -> None:
    srv, _ = server
    extra = ["Content-Length: 0"] if request_line.startswith(("POST", "PUT")) else []
    status, body = await raw(srv, request_line, *extra)
    assert SECRET not in body
    assert status in (400, 401), (status, body[:300])


@pytest.mark.parametrize(
    "header",
    [
        "Authorization: Basic YWRtaW46YWRtaW4=",
        "Authorization: Bearer ast_" + "x" * 43,
        "Authorization: Bearer",
        "Authorization: Bearer {token} extra",
        "Authorization: Bearer {token}, Bearer {token}",
        "authorization: Token {token}",
        "X-Authorization: Bearer {token}",
        "Cookie: token={token}",
        "Proxy-Authorization: Bearer {token}",
        "Authorization: Bearer {token}\r\nAuthorization: Bearer {token}",
    ],
)
async def test_no_other_place_or_shape_of_the_token_counts(
    server: tuple[TestServer, dict[str, str]], header: str
) -> None:
    srv, tokens = server
    status, body = await raw(
        srv, "GET /security/policies/ HTTP/1.1", header.format(token=tokens["admin"])
    )
    assert status == 401 and SECRET not in body
    assert "WWW-Authenticate: Bearer" in body


async def test_token_in_the_query_string_is_ignored(
    server: tuple[TestServer, dict[str, str]],
) -> None:
    srv, tokens = server
    for param in ("token", "access_token", "bearer", "authorization"):
        status, body = await raw(srv, f"GET /security/policies/?{param}={tokens['admin']} HTTP/1.1")
        assert status == 401 and SECRET not in body


async def test_lower_case_scheme_works(server: tuple[TestServer, dict[str, str]]) -> None:
    srv, tokens = server
    status, body = await raw(
        srv, "GET /security/policies/ HTTP/1.1", f"authorization: bearer {tokens['read']}"
    )
    assert status == 200 and SECRET in body


def test_the_worker_command_installs_the_middleware_before_the_worker_starts(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import agentstream.streams.cli as streams_cli
    import agentstream.streams.cli.core as streams_cli_core

    seen: list[bool] = []

    def fake_run_worker(args: list[str]) -> None:
        from agentstream.streams.app import app

        seen.append(web_auth.installed(app))

    monkeypatch.setattr(streams_cli_core, "run_worker", fake_run_worker)
    streams_cli.main(["worker"])
    assert seen == [True]


# -- HTTPS ---------------------------------------------------------------------------------------
def self_signed(tmp_path: Any) -> tuple[str, str]:
    """A certificate for 127.0.0.1 (IP SAN) and its key, as PEM files."""
    cert, key = tls_files.self_signed(tmp_path, ("agentstream-test", "127.0.0.1"), stem="web")
    return str(cert), str(key)


async def test_https_with_the_configured_certificate(tmp_path: Any) -> None:
    """The worker's server context and the client side (peers, CLI) fit together with one
    self-signed certificate, and Faust gets the context (create_app)."""
    import httpx

    from agentstream.streams.app import create_app

    certfile, keyfile = self_signed(tmp_path)
    tls = settings(
        web_tls_certfile=certfile, web_tls_keyfile=keyfile, data_dir=str(tmp_path / "data")
    )
    assert web_auth.web_scheme(tls) == "https"
    assert isinstance(create_app(tls).conf.web_ssl_context, web_auth.ssl.SSLContext)

    async def hello(request: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    app = web.Application()
    app.router.add_get("/health", hello)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=web_auth.server_ssl_context(tls))
    await site.start()
    port = runner.addresses[0][1]
    try:
        async with httpx.AsyncClient(verify=web_auth.client_verify(tls)) as http:
            assert (await http.get(f"https://127.0.0.1:{port}/health")).json() == {"ok": True}
        # a client that trusts only the system's CAs refuses this certificate
        async with httpx.AsyncClient(verify=web_auth.client_verify(settings())) as http:
            with pytest.raises(httpx.ConnectError):
                await http.get(f"https://127.0.0.1:{port}/health")
    finally:
        await runner.cleanup()


def test_a_public_route_still_grants_a_valid_tokens_scope() -> None:
    # /ready is public (probes), and shows its components' details to token holders only
    index, (value,) = index_with("read")
    s = snap(index)
    with_token = decide("GET", "/ready", auth(value), s, ready_public=True)
    assert with_token.allowed and with_token.scope == "read"
    wrong = decide("GET", "/ready", auth("ast_" + "b" * 43), s, ready_public=True)
    assert wrong.allowed and wrong.scope is None  # public: an anonymous caller
    assert decide("GET", "/ready", [], s, ready_public=True).scope is None


# -- managing the entries where the workers read them ---------------------------------------
def chain_provider(tmp_path: Any, sources: str) -> Any:
    from agentstream.streams.credentials import KeychainCredentialsProvider

    return KeychainCredentialsProvider(
        Settings.from_env(
            {
                "AGENTSTREAM_SECRET_SOURCES": sources,
                "AGENTSTREAM_SECRETS_DIR": str(tmp_path / "secrets"),
                "AGENTSTREAM_KEYRING_BACKEND": "plaintext-file",
                "AGENTSTREAM_KEYRING_FILE": str(tmp_path / "keyring.cfg"),
            }
        )
    )


async def test_revoke_never_reports_success_for_an_index_workers_do_not_read(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the index sits in a read-only source (env) ahead of a writable one (dir): a revoke
    # written to the dir would be shadowed by the variable, so it must refuse instead
    index, _ = index_with("admin")
    monkeypatch.setenv("AGENTSTREAM_SECRET_WEB_TOKENS", index.dumps())
    provider = chain_provider(tmp_path, "env,dir")
    with pytest.raises(CredentialsError, match="read-only"):
        await web_auth.revoke_token(provider, index.tokens[0].id)
    with pytest.raises(CredentialsError, match="read-only"):
        await web_auth.create_token(provider, "read", "x")
    assert not (tmp_path / "secrets" / INDEX_ENTRY).exists()
    monkeypatch.setenv("AGENTSTREAM_SECRET_WEB_CLUSTER_TOKEN", CLUSTER_VALUE)
    with pytest.raises(CredentialsError, match="read-only"):
        await web_auth.rotate_cluster_token(provider)
    cluster = (await load_snapshot(provider)).cluster
    assert cluster is not None and cluster.value == CLUSTER_VALUE


async def test_revoke_writes_where_the_index_is_read(tmp_path: Any) -> None:
    # keychain,dir with the index only in the dir: the change goes to the dir, not the
    # keychain (which the workers would never reach, the dir answering first)
    dir_only = chain_provider(tmp_path, "dir")
    value, record = await web_auth.create_token(dir_only, "admin", "ops")
    provider = chain_provider(tmp_path, "keychain,dir")
    await web_auth.revoke_token(provider, record.id)
    s = await load_snapshot(provider)
    assert s.index.find(value) is None
    assert decide("POST", "/checkpoints", auth(value), s, ready_public=True).status == 401
    assert (await load_snapshot(dir_only)).index.find(value) is None
    # an entry no source has goes to the first writable one, and is read back from it
    await web_auth.rotate_cluster_token(provider)
    cluster = (await load_snapshot(provider)).cluster
    assert cluster is not None and (tmp_path / "keyring.cfg").exists()
