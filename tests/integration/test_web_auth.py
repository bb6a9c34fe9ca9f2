"""Authenticated web views on real workers: every route the app registers (enumerated, not
listed by hand) answers 401 without a token, scopes hold (read cannot POST, read does not
see policy patterns), a revoke takes effect without a restart, a missing or broken token
index fails closed, forwarded lookups between workers authenticate with the cluster
token, and no token value reaches a worker's log. Plus a real headless Chromium opening
a view without a token."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from agentstream.schemas import Heartbeat, utc_now
from agentstream.streams import web_auth
from agentstream.streams.client import AsyncClient
from agentstream.streams.credentials import KeychainCredentialsProvider
from agentstream.streams.settings import Settings
from agentstream.streams.web_auth import CLUSTER_ENTRY, INDEX_ENTRY
from tests.conftest import _free_port
from tests.integration.test_web_cluster import spread
from tests.support import (
    REPO,
    Worker,
    await_until,
    cli,
    web_tokens,
    web_url,
    with_admin_key,
    with_web_tokens,
)

pytestmark = pytest.mark.integration

#: the routes this repository defines today: the enumeration must find at least these
#: (so that it cannot pass by finding nothing)
KNOWN = {
    ("GET", "/"),
    ("GET", "/health"),
    ("GET", "/ready"),
    ("GET", "/metrics"),
    ("GET", "/router/"),
    ("GET", "/agents/status/{agent_id}"),
    ("GET", "/security/policies/"),
    ("GET", "/security/decisions/"),
    ("GET", "/comms"),
    ("GET", "/llm/requests/{request_id}"),
    ("GET", "/system/stats"),
    ("GET", "/checkpoints"),
    ("POST", "/checkpoints"),
}

#: request targets that must not reach a protected view without a token (sent raw: an
#: HTTP client would normalise some of them away before they reach the worker)
ATTACKS = [
    "GET //security/policies/",
    "GET /security/policies",
    "GET /health/../security/policies/",
    "GET /health/%2e%2e/security/policies/",
    "GET /health%2F..%2Fsecurity%2Fpolicies%2F",
    "GET /%2Fsecurity/policies/",
    "GET /security%2Fpolicies/",
    "GET /%73ecurity/policies/",
    "GET /security/policies/?token={admin}",
    "GET /security/policies/?access_token={admin}",
    "GET /ready/../security/policies/",
    "GET http://127.0.0.1/health/../security/policies/",
    "HEAD /security/policies/",
    "OPTIONS /security/policies/",
    "POST /health",
    "GET /table/",
]

ROUTES_SCRIPT = """
import json
from agentstream.streams.app import app
app.discover()
app.web.init_server()
routes = app.web.web_app.router.routes()
print(json.dumps(sorted({(r.method, r.resource.canonical) for r in routes})))
"""


def registered_routes(env: dict[str, str]) -> list[tuple[str, str]]:
    """Every (method, route pattern) the worker app registers with `env`'s agents: the
    same modules a worker imports (autodiscovery) and Faust's own blueprints."""
    out = subprocess.run(
        [sys.executable, "-c", ROUTES_SCRIPT],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    return [(m, p) for m, p in json.loads(out.stdout.splitlines()[-1])]


def concrete(pattern: str) -> str:
    """A path the pattern matches (`{agent_id}` → `x`)."""
    return re.sub(r"\{[^}]+\}", "x", pattern)


async def raw(port: int, target: str, *headers: str) -> tuple[int, str]:
    """One request written byte for byte (method and target as given)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    lines = [f"{target} HTTP/1.1", "Host: 127.0.0.1", *headers, "Connection: close"]
    if target.startswith(("POST", "PUT")):
        lines.append("Content-Length: 0")
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
    await writer.drain()
    data = await asyncio.wait_for(reader.read(), 15)
    writer.close()
    status_line, _, rest = data.decode("latin-1").partition("\r\n")
    return int(status_line.split()[1]), rest


def assert_401(r: httpx.Response, what: str) -> None:
    assert r.status_code == 401, (what, r.status_code, r.text[:300])
    if r.request.method != "HEAD":  # a HEAD answer has no body
        body = r.json()
        assert body["error"] == "authentication required" and body["reason"], (what, body)
    assert r.headers["www-authenticate"].startswith('Bearer realm="agentstream"'), what


def no_token_in(text: str, *values: str) -> None:
    leaked = [v[:8] + "…" for v in values if v in text]
    assert not leaked, f"token values in the worker log: {leaked}"


POLICY = (
    "policy_id: secret-words\nlevel: standard\nblocked_patterns: ['(?i)launch\\s+code']\n"
    "allowed_patterns: ['^ok']\n"
)


async def test_every_route_needs_a_token_and_scopes_hold(
    settings_env: dict[str, str], tmp_path: Path
) -> None:
    env = with_admin_key({**settings_env, "AGENTSTREAM_AGENTS": "all"}, tmp_path)
    tokens = web_tokens(env)
    routes = registered_routes(env)
    assert set(routes) >= KNOWN, sorted(KNOWN - set(routes))
    (tmp_path / "policy.yaml").write_text(POLICY)
    applied = cli(env, "policy", "apply", str(tmp_path / "policy.yaml"))
    assert applied.returncode == 0, applied.stderr
    worker = Worker(env, tmp_path / "worker.log")
    await asyncio.to_thread(worker.start)
    port = int(env["AGENTSTREAM_WEB_PORT"])
    anon = httpx.AsyncClient(base_url=web_url(env), timeout=15)
    read = httpx.AsyncClient(base_url=web_url(env), timeout=15, headers=tokens.headers("read"))
    admin = httpx.AsyncClient(base_url=web_url(env), timeout=15, headers=tokens.headers("admin"))
    created: list[str] = []
    try:
        # -- every registered route: 401 without a token (and with a wrong one) ------------
        # HEAD is GET without the body (Faust answers it with get()): probes may send it
        public = {(m, p) for m in ("GET", "HEAD") for p in ("/health", "/ready")}
        # the console's page: static files, no data (its data routes need a token)
        assets = {(m, p) for m in ("GET", "HEAD") for p in web_auth.PUBLIC_ASSETS}
        for method, pattern in routes:
            path = concrete(pattern)
            if (method, pattern) in public:
                r = await anon.request(method, path)
                assert r.status_code in (200, 503), (method, pattern, r.text)
                assert method == "HEAD" or "status" in r.json(), (pattern, r.text)
                continue
            if (method, pattern) in assets:
                r = await anon.request(method, path, follow_redirects=False)
                assert r.status_code in (200, 302), (method, pattern, r.text[:200])
                # a static file of the package (with the page's CSP) or the redirect to one
                assert "content-security-policy" in r.headers or (
                    r.headers.get("location") == "/ui/"
                ), (pattern, r.headers)
                continue
            assert_401(await anon.request(method, path), f"{method} {pattern}")
            wrong = {"Authorization": "Bearer ast_" + "A" * 43}
            assert_401(await anon.request(method, path, headers=wrong), f"{method} {pattern}")
            if method == "GET":
                # streamed: /ui/api/stream answers with a body that never ends
                async with read.stream("GET", path) as r:
                    assert r.status_code not in (401, 403), (pattern, r.status_code)

        # -- ways around it -----------------------------------------------------------------
        for target in ATTACKS:
            status, rest = await raw(port, target.format(admin=tokens.admin))
            assert status in (400, 401), (target, status, rest[:300])
            assert '"policies"' not in rest and "launch" not in rest, target

        # -- /ready: statuses for anyone, their details (brokers, errors) with a token -----
        public_ready = (await anon.get("/ready")).json()["components"]
        assert public_ready and all(set(c) == {"status"} for c in public_ready.values())
        full_ready = (await read.get("/ready")).json()["components"]
        assert all("detail" in c for c in full_ready.values()), full_ready

        # -- scopes: read cannot POST, admin can; HEAD is a read, OPTIONS is not ------------
        denied = await read.post("/checkpoints")
        assert denied.status_code == 403, denied.text
        assert denied.json()["error"] == "forbidden" and "admin" in denied.json()["reason"]
        taken = await admin.post("/checkpoints")
        assert taken.status_code == 200 and taken.json()["reason"] == "on_demand", taken.text
        # HEAD is a read (GET without the body); OPTIONS is not
        assert (await read.head("/comms")).status_code == 200
        assert (await anon.head("/comms")).status_code == 401
        assert (await read.options("/comms")).status_code == 403
        cluster = {"Authorization": f"Bearer {tokens.cluster}"}
        assert (await anon.get("/comms", headers=cluster)).status_code == 200
        assert (await anon.post("/checkpoints", headers=cluster)).status_code == 403

        # -- the policies view: patterns for admin only ------------------------------------
        async def policy(client: httpx.AsyncClient) -> dict[str, Any]:
            body = (await client.get("/security/policies/")).json()
            found = [p for p in body["policies"] if p["policy_id"] == "secret-words"]
            return {"shown": body["patterns_shown"], **found[0]} if found else {}

        as_admin = await await_until(lambda: policy(admin), 60, what="policy in force")
        assert as_admin["shown"] is True
        assert as_admin["blocked_patterns"] == ["(?i)launch\\s+code"]
        assert as_admin["allowed_patterns"] == ["^ok"]
        as_read = await policy(read)
        assert as_read["shown"] is False and as_read["level"] == "standard"
        assert "blocked_patterns" not in as_read and "allowed_patterns" not in as_read
        assert "launch" not in (await read.get("/security/policies/")).text

        # -- /metrics with a token (what Prometheus sends) ----------------------------------
        assert_401(await anon.get("/metrics"), "/metrics")
        metrics = await read.get("/metrics")
        assert metrics.status_code == 200 and "# TYPE" in metrics.text

        # -- a token made and revoked while the worker runs ---------------------------------
        made = cli(env, "web", "token", "create", "--scope", "read", "--name", "temp")
        assert made.returncode == 0, made.stderr
        value = made.stdout.strip()
        token_id = re.search(r"token (\w+) \(temp, scope read\)", made.stderr)[1]  # type: ignore[index]
        created.append(value)
        assert value.startswith("ast_") and len(made.stdout.splitlines()) == 1
        mine = {"Authorization": f"Bearer {value}"}

        async def status_with(headers: dict[str, str]) -> int:
            return (await anon.get("/comms", headers=headers)).status_code

        await await_until(
            lambda: _is(status_with(mine), 200), 30, interval=0.5, what="new token accepted"
        )
        listed = cli(env, "web", "token", "list")
        assert token_id in listed.stdout and "temp" in listed.stdout
        assert value not in listed.stdout and tokens.read not in listed.stdout
        revoked = cli(env, "web", "token", "revoke", token_id)
        assert revoked.returncode == 0, revoked.stderr
        await await_until(
            lambda: _is(status_with(mine), 401), 30, interval=0.5, what="revoked token refused"
        )
        assert await status_with(tokens.headers("read")) == 200  # the others still work

        # -- the CLI: its token (web.token, admin here) works; a read one gets a clean 403 ---
        ok = cli(env, "checkpoints", "--take")
        assert ok.returncode == 0, ok.stderr
        as_read_cli = cli(
            env, "web", "token", "create", "--scope", "read", "--name", "cli-ro", "--for-cli"
        )
        created.append(as_read_cli.stdout.strip())
        cli_read = {"Authorization": f"Bearer {created[-1]}"}
        await await_until(
            lambda: _is(status_with(cli_read), 200), 30, interval=0.5, what="CLI token accepted"
        )
        refused = cli(env, "checkpoints", "--take")
        assert refused.returncode == 1 and "Traceback" not in refused.stderr, refused.stderr
        assert "HTTP 403" in refused.stderr and len(refused.stderr.strip().splitlines()) == 1

        log_text = (tmp_path / "worker.log").read_text(errors="replace")
        assert "web auth: bearer tokens required on every view but /health, /ready" in log_text
        assert "web auth: 2 token(s) accepted" in log_text  # read at start, ids only
        no_token_in(log_text, tokens.read, tokens.admin, tokens.cluster, *created)
    finally:
        for c in (anon, read, admin):
            await c.aclose()
        await asyncio.to_thread(worker.stop)
    no_token_in(
        (tmp_path / "worker.log").read_text(errors="replace"),
        tokens.read,
        tokens.admin,
        tokens.cluster,
        *created,
    )


async def _is(status: Any, want: int) -> bool:
    return bool(await status == want)


async def test_no_index_fails_closed_then_a_token_works_without_restart(
    settings_env: dict[str, str], tmp_path: Path
) -> None:
    """A worker whose keychain has no token index (and /ready not public): nothing but
    /health answers; the first token made works without a restart; a broken index is a
    503 that says so, never an open door."""
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    env = {
        **settings_env,
        "AGENTSTREAM_AGENTS": "health,comms",
        "AGENTSTREAM_WEB_READY_PUBLIC": "false",
        "AGENTSTREAM_KEYRING_FILE": str(fresh / "keyring.json"),
    }
    provider = KeychainCredentialsProvider(Settings.from_env(env))
    worker = Worker(env, tmp_path / "worker.log")
    await asyncio.to_thread(worker.start)
    http = httpx.AsyncClient(base_url=web_url(env), timeout=15)
    try:
        assert (await http.get("/health")).status_code == 200
        assert_401(await http.get("/ready"), "/ready is not public")
        some = {"Authorization": "Bearer ast_" + "b" * 43}
        r = await http.get("/comms", headers=some)
        assert_401(r, "no index")
        assert "no web tokens exist" in r.json()["reason"]

        # the CLI without a token of its own: one clear line, exit 1
        res = cli(env, "comms")
        assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr
        assert "HTTP 401" in res.stderr and "web token create" in res.stderr
        assert len(res.stderr.strip().splitlines()) == 1, res.stderr

        made = cli(env, "web", "token", "create", "--scope", "read", "--name", "first")
        assert made.returncode == 0, made.stderr
        mine = {"Authorization": f"Bearer {made.stdout.strip()}"}

        async def status(path: str, headers: dict[str, str]) -> int:
            return (await http.get(path, headers=headers)).status_code

        await await_until(
            lambda: _is(status("/comms", mine), 200), 30, interval=0.5, what="first token"
        )
        assert await status("/ready", mine) in (200, 503)

        await provider.set_secret(INDEX_ENTRY, '{"format": "agentstream-web-tokens", "tok')
        await await_until(
            lambda: _is(status("/comms", mine), 503), 30, interval=0.5, what="broken index"
        )
        broken = (await http.get("/comms", headers=mine)).json()
        assert broken["error"] == "authentication unavailable"
        assert "the worker's log says why" in broken["reason"], broken
        anon = (await http.get("/comms")).json()
        assert "not valid" not in anon["reason"], anon  # the cause is not told to anyone
        assert "web.tokens) is not valid" in (tmp_path / "worker.log").read_text(errors="replace")
        assert (await http.get("/health")).status_code == 200
        log_text = (tmp_path / "worker.log").read_text(errors="replace")
        assert "web auth: no token index (web.tokens): no token is accepted" in log_text
        assert "web auth: the token index (web.tokens) is not valid" in log_text
        no_token_in(log_text, made.stdout.strip())
    finally:
        await http.aclose()
        await asyncio.to_thread(worker.stop)


async def test_forwarded_lookups_carry_the_cluster_token(
    settings_env: dict[str, str], tmp_path: Path
) -> None:
    """Two workers with separate keychains: the client's token is known to the first
    only, the cluster token to both. A lookup the first forwards to the second can only
    succeed on the cluster token; without one, or with one the other does not accept,
    it fails with a reason instead."""
    base = {
        **settings_env,
        "AGENTSTREAM_AGENTS": "heartbeat",
        "AGENTSTREAM_TOPIC_PARTITIONS": "2",
        "AGENTSTREAM_HEARTBEAT_TIMEOUT_S": "3600",
    }
    env1 = {**base, "AGENTSTREAM_DATA_DIR": str(tmp_path / "w1")}
    other = tmp_path / "other"
    other.mkdir()
    env2 = with_web_tokens(
        {
            **{k: v for k, v in base.items() if not k.startswith("AGENTSTREAM_KEYRING")},
            "AGENTSTREAM_DATA_DIR": str(tmp_path / "w2"),
            "AGENTSTREAM_WEB_PORT": str(_free_port()),
        },
        other,
    )
    tokens1, tokens2 = web_tokens(env1), web_tokens(env2)
    p1 = KeychainCredentialsProvider(Settings.from_env(env1))
    p2 = KeychainCredentialsProvider(Settings.from_env(env2))
    await p2.set_secret(CLUSTER_ENTRY, tokens1.cluster)  # one cluster token, two keychains
    w1, w2 = Worker(env1, tmp_path / "w1.log"), Worker(env2, tmp_path / "w2.log")
    await asyncio.to_thread(w1.start)
    await asyncio.to_thread(w2.start)
    urls = [web_url(env1), web_url(env2)]
    http = httpx.AsyncClient(timeout=15, headers=tokens1.headers("read"))
    try:
        assert (await http.get(urls[1] + "/agents/status")).status_code == 401  # not w2's
        agents = spread("agent-", 6)
        async with AsyncClient(Settings.from_env(env1), source="test") as client:
            await client.publish_many(
                "agent.heartbeats",
                [Heartbeat(agent_id=a, sent_at=utc_now(), sequence=1) for a in agents],
            )

        async def local_share() -> set[str]:
            r = await http.get(urls[0] + "/agents/status", params={"local": "1"})
            return {d["agent_id"] for d in r.json()["agents"]} if r.status_code == 200 else set()

        # w1 holds some agents itself: the others are w2's, reached only by forwarding
        mine = await await_until(
            lambda: _share_of(local_share(), agents), 90, interval=0.5, what="split"
        )
        theirs = [a for a in agents if a not in mine]

        async def all_answered() -> bool:
            for a in theirs:
                r = await http.get(f"{urls[0]}/agents/status/{a}")
                if r.status_code != 200 or r.json()["agent_id"] != a:
                    return False
            body = (await http.get(urls[0] + "/agents/status")).json()
            return body["partial"] is False and len(body["agents"]) == len(agents)

        await await_until(all_answered, 90, interval=0.5, what="forwarded lookups answered")

        # w2 stops accepting that cluster token: w1's forwards are refused, and say so
        await p2.set_secret(CLUSTER_ENTRY, "z" * 43)

        async def refused() -> dict[str, Any]:
            r = await http.get(f"{urls[0]}/agents/status/{theirs[0]}")
            return r.json() if r.status_code == 503 else {}

        body = await await_until(refused, 30, interval=0.5, what="forward refused")
        assert "refused this worker's cluster token" in body["error"], body
        listing = (await http.get(urls[0] + "/agents/status")).json()
        assert listing["partial"] is True and "cluster token" in listing["missing"][0]["error"]

        # w1 has no cluster token at all: it does not even ask, and says why
        await p1.delete_secret(CLUSTER_ENTRY)

        async def not_asked() -> dict[str, Any]:
            r = await http.get(f"{urls[0]}/agents/status/{theirs[0]}")
            body = r.json() if r.status_code == 503 else {}
            return body if "no cluster token" in body.get("error", "") else {}

        body = await await_until(not_asked, 30, interval=0.5, what="no cluster token")
        assert "web.cluster_token" in body["error"]
        for log in ("w1.log", "w2.log"):
            no_token_in(
                (tmp_path / log).read_text(errors="replace"),
                tokens1.read,
                tokens1.admin,
                tokens1.cluster,
                tokens2.read,
                tokens2.admin,
            )
    finally:
        await http.aclose()
        await asyncio.to_thread(w2.stop)
        await asyncio.to_thread(w1.stop)


async def _share_of(share: Any, agents: list[str]) -> set[str]:
    got: set[str] = await share
    return got if 0 < len(got) < len(agents) else set()


@pytest.mark.browser
async def test_chromium_without_a_token_sees_the_401_json(
    settings_env: dict[str, str], tmp_path: Path
) -> None:
    from tests.integration.test_report_browser import CHROMIUM, chromium

    assert shutil.which(CHROMIUM), "chromium is missing (apt-get install -y chromium)"
    env = {**settings_env, "AGENTSTREAM_AGENTS": "health"}
    worker = Worker(env, tmp_path / "worker.log")
    await asyncio.to_thread(worker.start)
    try:
        res = await asyncio.to_thread(chromium, tmp_path, "--dump-dom", web_url(env) + "/metrics")
        assert res.returncode == 0, res.stderr[-2000:]
        page = res.stdout
        assert '"error": "authentication required"' in page, page
        assert '"reason": ' in page and "# TYPE" not in page
    finally:
        await asyncio.to_thread(worker.stop)
