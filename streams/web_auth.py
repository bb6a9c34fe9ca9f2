"""Bearer tokens for the web views, checked for every route by one aiohttp middleware.

The model
---------
A token is ``ast_`` + ``secrets.token_urlsafe(32)`` (256 random bits; the prefix makes a
leaked one recognisable to secret scanners). It has an id, a name, a creation time and a
scope: ``read`` (GET) or ``admin`` (every method). Only its SHA-256 is stored, in the
*token index*: the secret entry ``web.tokens`` of the credentials chain (keychain,
``AGENTSTREAM_SECRET_WEB_TOKENS``, or the file ``web.tokens`` in the secrets dir), a JSON
document written by ``agentstream web token create/revoke``::

    {"format": "agentstream-web-tokens", "version": 1,
     "tokens": [{"id": "3f9c1a2b", "name": "grafana", "scope": "read",
                 "created": "2026-01-02T03:04:05Z", "sha256": "<64 hex>"}]}

Two more entries: ``web.cluster_token`` is the value workers send each other on
forwarded lookups (`streams.web_cluster`; every worker accepts it, scope read), and
``web.token`` is the value the CLI sends (`streams.cli.worker_call`).

Workers re-read both entries at most every `INDEX_TTL_S` seconds (off the event loop: the
provider's calls run in a thread), so a revoke takes effect within that without a
restart. An index that is missing, unreadable or not valid grants nothing: every request
but the public ones gets a 401 or a 503 saying why, never an answer.

Why one middleware and why on the resolved route
------------------------------------------------
`install` puts `authenticate` first in the middleware list of Faust's aiohttp
application before the server starts, so aiohttp runs it around *every* handler —
each view, Faust's own (``/``, ``/router/``), views added later, and the 404/405 answers
for everything else. No view checks anything itself. Whether a request is public is
decided on the route the router *resolved* (its canonical pattern, ``/health``), never
on the path string: ``//security/policies/``, ``/health/../security/policies/`` or an
encoded path either resolve to a protected route or to none (401 either way), whatever
the router makes of them. Tokens are read from the ``Authorization`` header only: a
token in a query string ends up in proxies' and browsers' logs.

The decision itself (`decide`) is a plain function of the method, the resolved route,
the header and a snapshot of the index; the middleware only gathers those.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import hmac
import json
import logging
import re
import secrets
import ssl
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any, Literal, cast

from agentstream.streams.settings import Settings, SettingsError, get_settings

log = logging.getLogger(__name__)

Scope = Literal["read", "admin"]
SCOPES: tuple[Scope, ...] = ("read", "admin")
TOKEN_PREFIX = "ast_"  # noqa: S105 - a prefix, not a token
#: secret entries (credentials chain)
INDEX_ENTRY = "web.tokens"
CLUSTER_ENTRY = "web.cluster_token"
CLI_ENTRY = "web.token"
INDEX_FORMAT = "agentstream-web-tokens"
INDEX_VERSION = 1
#: how long a worker serves its last read of the index: the most a revoke waits
INDEX_TTL_S = 5.0
#: what a read token may do; everything else (POST, PUT, DELETE, HEAD, OPTIONS ...) needs
#: admin — HEAD and OPTIONS included: a method no view implements grants nothing to read
READ_METHODS = frozenset({"GET", "HEAD"})  # HEAD: GET's answer without the body (probes)
#: the id the cluster token is reported as (403s, logs)
CLUSTER_ID = "cluster"
#: a cluster token is a shared secret an operator may set by hand: not a weak one
MIN_CLUSTER_TOKEN_CHARS = 32
#: a bearer value longer than any token we issue is not one (and is not hashed)
MAX_TOKEN_CHARS = 512
#: RFC 6750 b64token
_B64TOKEN = re.compile(r"[A-Za-z0-9\-._~+/]+=*")
_HEX64 = re.compile(r"[0-9a-f]{64}")
_NAME = re.compile(r"[^\x00-\x1f\x7f]{1,64}")
_ID = re.compile(r"[a-z0-9]{4,32}")


@functools.cache
def _request_keys() -> tuple[Any, Any]:
    """Where the middleware leaves the granted scope on the request (see `scope_of`), and
    the id of the token that granted it ("" when none: auth off, a public route). Made
    on first use: aiohttp is imported by the worker's web server, not by every CLI
    start that reads this module's token helpers (a third of its start-up time)."""
    from aiohttp import web

    return (
        web.RequestKey("agentstream.web_scope", str),
        web.RequestKey("agentstream.web_token_id", str),
    )


REALM = 'Bearer realm="agentstream"'


class TokenIndexError(ValueError):
    """The token index is not one (bad JSON, a bad entry): it grants nothing."""


# -- tokens and the index ------------------------------------------------------------------
def hash_token(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


def same_hash(a: str, b: str) -> bool:
    """Constant-time comparison of two hex digests."""
    return hmac.compare_digest(a.encode(), b.encode())


def new_token_value() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def utc_stamp(now: datetime | None = None) -> str:
    return (now or datetime.now(UTC)).astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class TokenRecord:
    id: str
    name: str
    scope: Scope
    created: str
    sha256: str

    def allows(self, required: Scope) -> bool:
        return self.scope == "admin" or required == "read"

    def listing(self) -> dict[str, str]:
        """What `agentstream web token list` shows: never the hash (nor, of course, the value)."""
        return {"id": self.id, "name": self.name, "scope": self.scope, "created": self.created}


def check_scope(scope: str) -> Scope:
    for known in SCOPES:
        if scope == known:
            return known
    raise ValueError(f"scope must be one of {', '.join(SCOPES)}, not {scope!r}")


def check_name(name: str) -> str:
    if not _NAME.fullmatch(name) or name != name.strip():
        raise ValueError("a token name is 1-64 printable characters, no surrounding spaces")
    return name


@dataclass(frozen=True)
class TokenIndex:
    tokens: tuple[TokenRecord, ...] = ()

    @classmethod
    def parse(cls, text: str) -> TokenIndex:
        """The index in `text`; any problem is a `TokenIndexError` naming it (never
        quoting a hash), so that one bad entry cannot be silently skipped."""
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as exc:
            # the position only: the message of some errors quotes the document
            raise TokenIndexError(f"not JSON (line {exc.lineno}, column {exc.colno})") from None
        if not isinstance(doc, dict) or doc.get("format") != INDEX_FORMAT:
            raise TokenIndexError(f"not a token index (format must be {INDEX_FORMAT!r})")
        if doc.get("version") != INDEX_VERSION:
            raise TokenIndexError(f"unknown version {doc.get('version')!r}")
        raw = doc.get("tokens")
        if not isinstance(raw, list):
            raise TokenIndexError("'tokens' must be a list")
        out: list[TokenRecord] = []
        for n, item in enumerate(raw):
            out.append(_record(n, item))
        ids = [t.id for t in out]
        if len(set(ids)) != len(ids):
            raise TokenIndexError("two tokens have the same id")
        if len({t.sha256 for t in out}) != len(out):
            raise TokenIndexError("two tokens have the same hash")
        return cls(tuple(out))

    def dumps(self) -> str:
        return json.dumps(
            {
                "format": INDEX_FORMAT,
                "version": INDEX_VERSION,
                "tokens": [t.__dict__ for t in self.tokens],
            },
            indent=1,
        )

    def find(self, value: str) -> TokenRecord | None:
        """The token whose hash is `value`'s. Every entry is compared, in constant time
        each, whatever matched: the time taken says nothing about which hash is near."""
        digest = hash_token(value)
        found = None
        for t in self.tokens:
            if same_hash(digest, t.sha256):
                found = t
        return found

    def with_new(
        self, scope: str, name: str, *, now: datetime | None = None
    ) -> tuple[TokenIndex, str, TokenRecord]:
        """The index with a fresh token added, the token's value (shown once) and its record."""
        value = new_token_value()
        taken = {t.id for t in self.tokens}
        token_id = secrets.token_hex(4)
        while token_id in taken:
            token_id = secrets.token_hex(4)
        record = TokenRecord(
            id=token_id,
            name=check_name(name),
            scope=check_scope(scope),
            created=utc_stamp(now),
            sha256=hash_token(value),
        )
        return replace(self, tokens=(*self.tokens, record)), value, record

    def without(self, token_id: str) -> tuple[TokenIndex, TokenRecord]:
        for t in self.tokens:
            if t.id == token_id:
                return replace(self, tokens=tuple(x for x in self.tokens if x.id != token_id)), t
        raise KeyError(token_id)


def _record(n: int, item: Any) -> TokenRecord:
    where = f"token #{n + 1}"
    if not isinstance(item, dict):
        raise TokenIndexError(f"{where} is not an object")
    missing = [k for k in ("id", "name", "scope", "created", "sha256") if k not in item]
    if missing:
        raise TokenIndexError(f"{where} lacks {', '.join(missing)}")
    if not all(isinstance(item[k], str) for k in ("id", "name", "scope", "created", "sha256")):
        raise TokenIndexError(f"{where}: every field is a string")
    if not _ID.fullmatch(item["id"]):
        raise TokenIndexError(f"{where}: id must be 4-32 lower-case letters or digits")
    where = f"token {item['id']}"
    if item["scope"] not in SCOPES:
        raise TokenIndexError(f"{where}: scope must be one of {', '.join(SCOPES)}")
    if not _HEX64.fullmatch(item["sha256"]):
        raise TokenIndexError(f"{where}: sha256 must be 64 lower-case hex digits")
    if not _NAME.fullmatch(item["name"]):
        raise TokenIndexError(f"{where}: name must be 1-64 printable characters")
    return TokenRecord(
        id=item["id"],
        name=item["name"],
        scope=item["scope"],
        created=item["created"],
        sha256=item["sha256"],
    )


# -- what a worker knows: one read of the secret entries -------------------------------------
class ClusterToken:
    """The cluster token's value (workers send it to each other). Its repr never shows it."""

    __slots__ = ("digest", "value")

    def __init__(self, value: str) -> None:
        self.value = value
        self.digest = hash_token(value)

    def __repr__(self) -> str:
        return "ClusterToken(****)"


@dataclass(frozen=True)
class Snapshot:
    """One read of the index and the cluster token. `index` None and `index_error` empty:
    the entry does not exist; a non-empty error: it exists (or the chain failed) but
    cannot be used."""

    index: TokenIndex | None = None
    index_error: str = ""
    cluster: ClusterToken | None = None
    cluster_error: str = ""


def snapshot_of(
    index_text: str | None,
    cluster_value: str | None,
    *,
    index_read_error: str = "",
    cluster_read_error: str = "",
) -> Snapshot:
    """What the raw entries (or the errors reading them) amount to."""
    index, index_error = None, index_read_error
    if not index_error and index_text is not None:
        try:
            index = TokenIndex.parse(index_text)
        except TokenIndexError as exc:
            index_error = f"the token index ({INDEX_ENTRY}) is not valid: {exc}"
    cluster, cluster_error = None, cluster_read_error
    if not cluster_error and cluster_value is not None:
        if len(cluster_value) < MIN_CLUSTER_TOKEN_CHARS:
            cluster_error = (
                f"the cluster token ({CLUSTER_ENTRY}) is shorter than "
                f"{MIN_CLUSTER_TOKEN_CHARS} characters"
            )
        elif not _B64TOKEN.fullmatch(cluster_value):
            cluster_error = (
                f"the cluster token ({CLUSTER_ENTRY}) has characters a bearer token cannot "
                "carry (letters, digits and -._~+/ only)"
            )
        else:
            cluster = ClusterToken(cluster_value)
    return Snapshot(index, index_error, cluster, cluster_error)


def cluster_problem(snap: Snapshot) -> str:
    """Why this worker cannot send a cluster token ('' when it can)."""
    if snap.cluster is not None:
        return ""
    return snap.cluster_error or (
        f"no cluster token (secret {CLUSTER_ENTRY}): workers cannot ask each other; "
        "create one with `agentstream web cluster-token rotate`"
    )


# -- the decision ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Decision:
    status: int
    scope: Scope | None = None
    token_id: str = ""
    error: str = ""
    reason: str = ""
    headers: dict[str, str] = field(default_factory=dict)

    @property
    def allowed(self) -> bool:
        return self.status == 200

    def body(self) -> dict[str, str]:
        return {"error": self.error, "reason": self.reason}


#: the operator console's static files (`agents.health.console`): the same for everyone
#: and holding no data, they are public because a browser's navigation to a page cannot
#: send an Authorization header; the data the page shows comes from routes that need one
PUBLIC_ASSETS = frozenset({"/ui", "/ui/", "/ui/console.js", "/ui/console.css"})


def public_routes(ready_public: bool) -> frozenset[str]:
    return frozenset({"/health", "/ready"} if ready_public else {"/health"}) | PUBLIC_ASSETS


def required_scope(method: str) -> Scope:
    return "read" if method.upper() in READ_METHODS else "admin"


def _unauthorized(reason: str, *, invalid: bool = False) -> Decision:
    challenge = f'{REALM}, error="invalid_token"' if invalid else REALM
    return Decision(
        401,
        error="authentication required",
        reason=reason,
        headers={"WWW-Authenticate": challenge},
    )


def bearer(headers: Sequence[str]) -> str | Decision:
    """The token of the one ``Authorization: Bearer <token>`` header, or the 401 why not.
    The scheme is case-insensitive (RFC 7235); the token is one b64token (RFC 6750)."""
    if not headers:
        return _unauthorized(
            "send Authorization: Bearer <token> (tokens are never read from the URL)"
        )
    if len(headers) > 1:
        return _unauthorized("more than one Authorization header")
    scheme, _, rest = headers[0].strip().partition(" ")
    if scheme.lower() != "bearer":
        return _unauthorized("the Authorization scheme must be Bearer")
    token = rest.strip(" ")
    if not token or len(token) > MAX_TOKEN_CHARS or not _B64TOKEN.fullmatch(token):
        return _unauthorized("malformed bearer token", invalid=True)
    return token


def decide(
    method: str,
    route: str | None,
    authorization: Sequence[str],
    snap: Snapshot,
    *,
    ready_public: bool,
) -> Decision:
    """Whether a request may reach its handler. `route` is the canonical pattern the
    router resolved (None: nothing matched, a 404 or 405 — which needs a token too, so
    that an anonymous caller cannot even tell which paths exist)."""
    method = method.upper()
    if method in READ_METHODS and route is not None and route in public_routes(ready_public):
        if authorization:
            # public, but a valid token still grants its scope (/ready shows its details
            # to a token holder only); any other header is an anonymous caller's
            granted = decide("GET", None, authorization, snap, ready_public=False)
            if granted.allowed:
                return granted
        return Decision(200)
    token = bearer(authorization)
    if isinstance(token, Decision):
        return token
    record = snap.index.find(token) if snap.index is not None else None
    if (
        record is None
        and snap.cluster is not None
        and same_hash(hash_token(token), snap.cluster.digest)
    ):
        record = TokenRecord(CLUSTER_ID, "cluster", "read", "", snap.cluster.digest)
    if record is None:
        if snap.index_error:
            return Decision(
                503,
                error="authentication unavailable",
                # why is in the worker's log: an anonymous caller learns no token ids,
                # backend names or paths from it
                reason="the web token store cannot be read (the worker's log says why); "
                "no request is let through until it is fixed",
            )
        if snap.index is None:
            return _unauthorized(
                f"no web tokens exist (secret {INDEX_ENTRY} is missing): create one with "
                "`agentstream web token create`",
                invalid=True,
            )
        return _unauthorized("unknown or revoked token", invalid=True)
    need = required_scope(method)
    if not record.allows(need):
        return Decision(
            403,
            scope=record.scope,
            token_id=record.id,
            error="forbidden",
            reason=f"{method} needs scope {need}; token {record.id} has scope {record.scope}",
        )
    return Decision(200, scope=record.scope, token_id=record.id)


# -- reading the entries, with a TTL -----------------------------------------------------------
Loader = Callable[[], Awaitable[Snapshot]]


class TokenCache:
    """The last `Snapshot`, re-read when older than `ttl` (one read at a time: concurrent
    requests wait for the same read instead of each starting one)."""

    def __init__(
        self, load: Loader, *, ttl: float = INDEX_TTL_S, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._load = load
        self.ttl = ttl
        self._clock = clock
        self._snap: Snapshot | None = None
        self._read_at = 0.0
        self._lock: asyncio.Lock | None = None

    def fresh(self) -> bool:
        return self._snap is not None and self._clock() - self._read_at < self.ttl

    async def get(self) -> Snapshot:
        if self.fresh():
            assert self._snap is not None
            return self._snap
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            if not self.fresh():
                snap = await self._load()
                self._changed(self._snap, snap)
                self._snap, self._read_at = snap, self._clock()
        assert self._snap is not None
        return self._snap

    @staticmethod
    def _changed(old: Snapshot | None, new: Snapshot) -> None:
        # ids and counts only: never a value nor a hash
        def summary(s: Snapshot | None) -> tuple[Any, ...]:
            if s is None:
                return (None,)
            ids = tuple(sorted(t.id for t in s.index.tokens)) if s.index else None
            return (ids, s.index_error, s.cluster.digest if s.cluster else None, s.cluster_error)

        if summary(old) == summary(new):
            return
        if new.index_error:
            log.error("web auth: %s: every request needing a token gets 503", new.index_error)
        elif new.index is None:
            log.warning("web auth: no token index (%s): no token is accepted", INDEX_ENTRY)
        else:
            log.info(
                "web auth: %d token(s) accepted (ids %s)",
                len(new.index.tokens),
                ", ".join(t.id for t in new.index.tokens) or "-",
            )
        if cluster_problem(new):
            log.warning("web auth: %s", cluster_problem(new))


async def load_snapshot(provider: Any) -> Snapshot:
    """Read both entries through the credentials chain (its calls run in a thread).
    A failing chain is an error of the entry (fail closed), not an exception."""
    from agentstream.streams.errors import CredentialsError

    async def read(entry: str) -> tuple[str | None, str]:
        try:
            return await provider.get_secret(entry), ""
        except CredentialsError as exc:
            return None, f"cannot read secret {entry}: {exc}"

    (index_text, index_err), (cluster_value, cluster_err) = await asyncio.gather(
        read(INDEX_ENTRY), read(CLUSTER_ENTRY)
    )
    return snapshot_of(
        index_text, cluster_value, index_read_error=index_err, cluster_read_error=cluster_err
    )


def provider_loader(settings: Settings) -> Loader:
    """A loader reading through `KeychainCredentialsProvider(settings)`, built on first
    use in a thread (resolving a keyring backend can probe D-Bus) and kept: an encrypted
    file keyring derives its key once per instance."""
    from agentstream.streams.credentials import KeychainCredentialsProvider
    from agentstream.streams.errors import CredentialsError

    provider: list[Any] = []

    async def load() -> Snapshot:
        if not provider:
            try:
                provider.append(await asyncio.to_thread(KeychainCredentialsProvider, settings))
            except CredentialsError as exc:
                why = f"no credentials chain: {exc}"
                return snapshot_of(None, None, index_read_error=why, cluster_read_error=why)
        return await load_snapshot(provider[0])

    return load


# -- the worker side ------------------------------------------------------------------------
class Gate:
    """What a worker checks requests against (one per process, see `gate`)."""

    def __init__(self, settings: Settings, cache: TokenCache | None = None) -> None:
        self.settings = settings
        self.enabled = settings.web_auth != "off"
        self.cache = cache or TokenCache(provider_loader(settings))

    async def check(self, method: str, route: str | None, authorization: Sequence[str]) -> Decision:
        if not self.enabled:
            # AGENTSTREAM_WEB_AUTH=off: whatever authenticates sits in front of the worker
            return Decision(200, scope="admin")
        if (
            method.upper() in READ_METHODS
            and route in public_routes(self.settings.web_ready_public)
            and not authorization
        ):
            return Decision(200)  # without reading any secret: probes work while it is broken
        snap = await self.cache.get()  # a public route with a token: `decide` grants its scope
        return decide(
            method, route, authorization, snap, ready_public=self.settings.web_ready_public
        )

    async def peer_headers(self) -> dict[str, str]:
        """The headers of a request to another worker: the cluster token as bearer.
        Raises `PeerAuthError` when auth is on and there is no usable cluster token."""
        snap = await self.cache.get()
        if snap.cluster is not None:
            return {"Authorization": f"Bearer {snap.cluster.value}"}
        if not self.enabled:
            return {}
        raise PeerAuthError(cluster_problem(snap))


class PeerAuthError(Exception):
    """This worker has no cluster token to send: a forwarded lookup would be refused."""


_gate: Gate | None = None


def gate(settings: Settings | None = None) -> Gate:
    """This process's gate (created on first use from `settings` or the environment's)."""
    global _gate
    if _gate is None:
        _gate = Gate(settings or get_settings())
    return _gate


def resolved_route(request: Any) -> str | None:
    """The canonical pattern of the route aiohttp resolved for `request`; None for a 404
    or 405 (the router answers those with a system route that has no resource)."""
    info = request.match_info
    if getattr(info, "http_exception", None) is not None:
        return None
    resource = getattr(getattr(info, "route", None), "resource", None)
    return None if resource is None else str(resource.canonical)


def token_id_of(request: Any) -> str:
    """The id of the token the middleware accepted for this request ("" when none)."""
    value = request.get(_request_keys()[1]) if hasattr(request, "get") else None
    return value if isinstance(value, str) else ""


def scope_of(request: Any) -> Scope | None:
    """The scope the middleware granted this request (None: anonymous, a public route —
    or no middleware ran at all, which a view must treat as no privilege)."""
    value = request.get(_request_keys()[0]) if hasattr(request, "get") else None
    return cast(Scope, value) if value in SCOPES else None


def is_admin(request: Any) -> bool:
    return scope_of(request) == "admin"


def middleware(the_gate: Gate) -> Any:
    from aiohttp import web

    scope_key, token_id_key = _request_keys()

    @web.middleware
    async def authenticate(request: Any, handler: Any) -> Any:
        decision = await the_gate.check(
            request.method, resolved_route(request), request.headers.getall("Authorization", [])
        )
        if not decision.allowed:
            return web.json_response(
                decision.body(), status=decision.status, headers=decision.headers
            )
        request[scope_key] = decision.scope
        request[token_id_key] = decision.token_id
        return await handler(request)

    authenticate.agentstream_auth = True  # type: ignore[attr-defined]
    return authenticate


def installed(app: Any) -> bool:
    return any(getattr(m, "agentstream_auth", False) for m in app.web.web_app.middlewares)


def install(app: Any, settings: Settings | None = None) -> Gate:
    """Put the authentication middleware first on `app`'s web application (idempotent).
    Must run before the web server starts: aiohttp freezes the list then, and raises
    here if it is too late rather than serving unauthenticated."""
    the_gate = gate(settings)
    if not installed(app):
        app.web.web_app.middlewares.insert(0, middleware(the_gate))
        app.web.web_app.on_startup.append(_started(the_gate))
        app.web.web_app.on_response_prepare.append(secure_headers)
    return the_gate


#: what every response carries unless its view set its own (the console page does)
SECURE_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Content-Security-Policy": "default-src 'none'; frame-ancestors 'none'",
}


async def secure_headers(request: Any, response: Any) -> None:
    """aiohttp's on_response_prepare: no view's answer is sniffed into HTML by a browser
    or framed by another page, whatever its content type."""
    for name, value in SECURE_HEADERS.items():
        response.headers.setdefault(name, value)


def _started(the_gate: Gate) -> Callable[[Any], Awaitable[None]]:
    async def on_startup(_web_app: Any) -> None:
        # when the server starts (the worker's logging is set up by then), not at
        # install; the first read of the index here shows a missing or broken one at
        # start in the log, not at the first request
        if not the_gate.enabled:
            log.warning(
                "web auth: OFF (AGENTSTREAM_WEB_AUTH=off): every view answers anyone who "
                "reaches %s:%s",
                the_gate.settings.web_host,
                the_gate.settings.web_port,
            )
            return
        public = sorted(public_routes(the_gate.settings.web_ready_public) - PUBLIC_ASSETS)
        log.info(
            "web auth: bearer tokens required on every view but %s (and the console's "
            "static files under /ui/)",
            ", ".join(public),
        )
        await the_gate.cache.get()

    return on_startup


# -- TLS --------------------------------------------------------------------------------------
def server_ssl_context(settings: Settings) -> ssl.SSLContext | None:
    """Faust's ``web_ssl_context`` from AGENTSTREAM_WEB_TLS_CERTFILE/KEYFILE (None: HTTP)."""
    if settings.web_tls_certfile is None or settings.web_tls_keyfile is None:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(str(settings.web_tls_certfile), str(settings.web_tls_keyfile))
    except (ssl.SSLError, OSError) as exc:
        # OpenSSL says only "[SSL] PEM lib" or "KEY_VALUES_MISMATCH": name the settings
        # and what they must hold
        reason = getattr(exc, "reason", None) or getattr(exc, "strerror", None) or str(exc)
        reason = re.sub(r"\s*\(_ssl\.c:\d+\)", "", str(reason))
        raise SettingsError(
            "AGENTSTREAM_WEB_TLS_CERTFILE/KEYFILE: cannot load the web server's certificate "
            f"and key ({reason}): both must be PEM files (-----BEGIN ...-----), the key "
            "unencrypted and matching the certificate",
            field="web_tls_certfile",
        ) from None
    return ctx


def client_verify(settings: Settings) -> ssl.SSLContext:
    """How a client of the web views (another worker, the CLI) checks the server: the
    system's CAs, plus the configured certificate itself, so that a cluster sharing one
    self-signed certificate works without a CA."""
    certfile = settings.web_tls_certfile
    return _client_context(None if certfile is None else str(certfile))


@functools.lru_cache(maxsize=4)
def _client_context(certfile: str | None) -> ssl.SSLContext:
    # one per certificate: loading the system's CAs for every forwarded lookup costs
    # more than the lookup
    ctx = ssl.create_default_context()
    if certfile is not None:
        with contextlib.suppress(OSError, ssl.SSLError):
            ctx.load_verify_locations(cafile=certfile)
    return ctx


def web_scheme(settings: Settings) -> str:
    return "https" if settings.web_tls_certfile is not None else "http"


# -- the CLI side: managing the entries ---------------------------------------------------------
async def read_index(provider: Any) -> TokenIndex:
    """The index for changing it (missing: empty; unreadable: raises, nothing is rewritten
    over an index that could not be read)."""
    text = await provider.get_secret(INDEX_ENTRY)
    return TokenIndex() if text is None else TokenIndex.parse(text)


# The entries are changed with `update_secret`: in the source the workers read them from
# (a value stored to another source would be shadowed, and a revoke not take effect), read
# back afterwards. A create and a revoke run at the same time both read, change and write
# the whole index, without a lock (a keychain has none to offer): the later write wins and
# the other change is lost, unless the read-back sees it and reports the error. Run them
# one at a time and check with `web token list`.
async def create_token(provider: Any, scope: str, name: str) -> tuple[str, TokenRecord]:
    index, value, record = (await read_index(provider)).with_new(scope, name)
    await provider.update_secret(INDEX_ENTRY, index.dumps())
    return value, record


async def revoke_token(provider: Any, token_id: str) -> TokenRecord:
    index, record = (await read_index(provider)).without(token_id)
    await provider.update_secret(INDEX_ENTRY, index.dumps())
    return record


async def rotate_cluster_token(provider: Any) -> str:
    value = new_token_value()
    await provider.update_secret(CLUSTER_ENTRY, value)
    return value


def listing(index: TokenIndex) -> Iterable[dict[str, str]]:
    return (t.listing() for t in index.tokens)
