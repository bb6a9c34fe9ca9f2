"""What HTTP providers share: one httpx client per provider, error mapping, Retry-After."""

from __future__ import annotations

import contextlib
import email.utils
import logging
import sys
import time
from collections.abc import AsyncIterator
from datetime import UTC
from typing import Any
from urllib.parse import urlsplit

import httpcore
import httpx

from agentstream.agents.llm.providers._net import AsyncioBackend
from agentstream.agents.llm.providers.base import LLMProvider, ProviderConfig, SecretSource
from agentstream.streams.errors import (
    ProviderConnectionError,
    ProviderError,
    ProviderRateLimited,
    ProviderRequestError,
    ProviderServerError,
    ProviderTimeout,
)


def _cache_missing_sniffio() -> None:
    """httpcore asks `import sniffio` on every lock/event it sets up (several per request)
    and falls back to asyncio when it is missing, as here: a failed import is not cached,
    so each one searched sys.path again — ~40 µs, ~0.2 ms of CPU per request. A None
    entry in sys.modules is Python's own "known missing" marker: the import fails the same
    way, without the search."""
    try:
        import sniffio  # noqa: F401
    except ImportError:
        sys.modules.setdefault("sniffio", None)  # type: ignore[arg-type]


_cache_missing_sniffio()

# httpx logs every request at INFO ("HTTP Request: POST … 200 OK"): at a worker's
# --loglevel info that is one formatted log record per LLM call (~70 µs, a tenth of a
# call's CPU in the bench) saying nothing our own attempt records don't. Failures are
# logged and recorded by the processor. An explicitly configured level is kept.
if logging.getLogger("httpx").level == logging.NOTSET:
    logging.getLogger("httpx").setLevel(logging.WARNING)

#: bytes of an error body quoted in the error message (bodies can be huge HTML pages)
ERROR_BODY_CHARS = 300


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Retry-After as seconds: delta-seconds or an HTTP date (RFC 9110 §10.2.3)."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def error_for_status(
    provider: str, status: int, body: str, headers: httpx.Headers
) -> ProviderError:
    snippet = body[:ERROR_BODY_CHARS]
    msg = f"{provider}: HTTP {status}: {snippet}".rstrip(": ")
    if status == 429:
        return ProviderRateLimited(
            msg,
            provider=provider,
            status_code=status,
            retry_after_s=parse_retry_after(headers.get("retry-after")),
        )
    if status == 408:
        return ProviderTimeout(msg, provider=provider, status_code=status)
    if status >= 500:
        return ProviderServerError(
            msg,
            provider=provider,
            status_code=status,
            retry_after_s=parse_retry_after(headers.get("retry-after")),
        )
    return ProviderRequestError(msg, provider=provider, status_code=status)


def error_for_transport(provider: str, exc: httpx.HTTPError) -> ProviderError:
    # httpx messages carry no headers, so no key can leak through them
    detail = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    if isinstance(exc, httpx.TimeoutException):
        return ProviderTimeout(f"{provider}: timed out ({detail})", provider=provider)
    return ProviderConnectionError(f"{provider}: {detail}", provider=provider)


class LineSplitter:
    """Bytes of a streamed body → complete lines (without their ending), as SSE and
    NDJSON need them. Reading `aiter_bytes()` and splitting here replaces httpx's
    `aiter_lines()`, whose text and line decoders add two async-generator layers per
    network read. Lines end in LF, CRLF or CR (SSE allows all three)."""

    __slots__ = ("_rest",)

    def __init__(self) -> None:
        self._rest = b""

    def feed(self, chunk: bytes) -> list[bytes]:
        buf = self._rest + chunk if self._rest else chunk
        if b"\r" in buf:
            # a CR at the very end may be the first half of a CRLF: keep it for later
            held = buf.endswith(b"\r")
            if held:
                buf = buf[:-1]
            buf = buf.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
            lines = buf.split(b"\n")
            self._rest = lines.pop() + (b"\r" if held else b"")
            return lines
        lines = buf.split(b"\n")
        self._rest = lines.pop()
        return lines

    def end(self) -> list[bytes]:
        """The unterminated last line, if any."""
        rest, self._rest = self._rest.rstrip(b"\r"), b""
        return [rest] if rest else []


def origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}".lower()


def endpoint(url: str) -> tuple[str, str]:
    """A base URL as compared for `api_endpoint`: its origin and its path (no trailing
    slash; the path's case kept, as servers route by it)."""
    return origin(url), urlsplit(url).path.rstrip("/")


_BACKEND = AsyncioBackend()


def use_asyncio_backend(client: httpx.AsyncClient) -> bool:
    """Direct connections of `client` (not those through a proxy from the environment,
    which keep httpx's own backend) use the plain-asyncio backend of `_net`. httpx offers
    no parameter for httpcore's `network_backend`, so it is set on the pool httpx built
    with every other setting of the client (TLS context, limits, keep-alive). Returns
    whether it could; a test fails if an httpx upgrade moves the attribute."""
    pool = getattr(getattr(client, "_transport", None), "_pool", None)
    if type(pool) is httpcore.AsyncConnectionPool and hasattr(pool, "_network_backend"):
        pool._network_backend = _BACKEND
        return True
    return False


_NO_STREAM = httpx.ByteStream(b"")


def free_cycle(resp: httpx.Response) -> None:
    """Let reference counting free a finished call at once.

    An `httpx.Response` and the stream it reads from refer to each other, so every call
    left ~40 objects (request, headers, URL, httpcore's pool request, events …) that
    only the cyclic garbage collector could free. At a few hundred calls per second
    that garbage was nearly all the worker's, and it set off collections that paused
    the event loop 10-50 ms several times a second (the LLM stage's latency tail). A
    closed response's stream is never read again: replacing it breaks the cycle."""
    if resp.is_closed:
        resp.stream = _NO_STREAM


class ClientPool:
    """Connections as a LIFO free-list of single-connection httpx clients.

    One shared `httpx.AsyncClient` serialises a burst of concurrent requests onto a few
    keep-alive connections: httpcore assigns every queued request to the same idle
    connection in one pass (it stays "idle" until its request starts; encode/httpcore
    #1110), so 200 simultaneous streams ran over ~8 connections and waited seconds for
    each other. Here a call leases a client of its own (one kept-alive connection),
    returns it afterwards, and the next call reuses the warmest one.
    """

    def __init__(
        self,
        *,
        timeout: httpx.Timeout,
        transport: httpx.AsyncBaseTransport | None = None,
        max_idle: int = 256,
    ) -> None:
        self._timeout = timeout
        self._transport = transport
        self._max_idle = max_idle
        self._idle: list[httpx.AsyncClient] = []
        self._ssl: Any = None
        self._closed = False

    def _new(self) -> httpx.AsyncClient:
        if self._transport is not None:
            return httpx.AsyncClient(transport=self._transport, timeout=self._timeout)
        if self._ssl is None:
            self._ssl = httpx.create_ssl_context()  # ~10 ms each: build it once
        client = httpx.AsyncClient(
            verify=self._ssl,
            timeout=self._timeout,
            limits=httpx.Limits(max_connections=1, max_keepalive_connections=1),
        )
        use_asyncio_backend(client)
        return client

    @contextlib.asynccontextmanager
    async def lease(self) -> AsyncIterator[httpx.AsyncClient]:
        client = self._idle.pop() if self._idle else self._new()
        try:
            yield client
        finally:
            if self._closed or len(self._idle) >= self._max_idle or client.is_closed:
                await client.aclose()
            else:
                self._idle.append(client)

    async def aclose(self) -> None:
        self._closed = True
        idle, self._idle = self._idle, []
        for client in idle:
            await client.aclose()


class HTTPProvider(LLMProvider):
    """Base for providers over httpx: lazily created client, key from the keychain."""

    def __init__(
        self,
        config: ProviderConfig,
        *,
        secrets: SecretSource | None = None,
        default_timeout_s: float = 60.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        super().__init__(config)
        self._secrets = secrets
        self._timeout_s = config.timeout_s or default_timeout_s
        self._transport = transport
        self._pool: ClientPool | None = None
        self._key: str | None = None
        self._key_loaded = False

    async def initialize(self) -> None:
        if self._pool is None:
            self._pool = ClientPool(timeout=self._timeout(None), transport=self._transport)
        if self.config.requires_key and not self._key_loaded:
            self._key = await self._load_key()
            self._key_loaded = True

    async def _load_key(self) -> str | None:
        if self._secrets is None:
            return None
        return await self._secrets(f"llm.{self.name}.api_key")

    def _timeout(self, timeout_s: float | None) -> httpx.Timeout:
        t = timeout_s or self._timeout_s
        return httpx.Timeout(t, connect=min(t, self.config.connect_timeout_s))

    async def pool(self) -> ClientPool:
        if self._pool is None or (self.config.requires_key and not self._key_loaded):
            await self.initialize()
        assert self._pool is not None
        return self._pool

    def api_key(self) -> str | None:
        if self.config.requires_key and not self._key:
            raise ProviderRequestError(
                f"{self.name}: no API key in the keychain under llm.{self.name}.api_key",
                provider=self.name,
            )
        return self._key

    def redact(self, text: str) -> str:
        """`text` without the provider's secrets: its API key and the values of the
        operator's own `headers` (a gateway's key), each `***`. Error bodies are quoted
        in responses and logs, and a server may echo what it was sent (some do, in 401
        messages)."""
        for secret in self._secrets_to_redact():
            if secret in text:
                text = text.replace(secret, "***")
        return text

    def _secrets_to_redact(self) -> list[str]:
        # header values shorter than 8 characters are no secrets worth hiding (and would
        # blank out common words); longest first, so that one containing another goes whole
        values = [v for v in self.config.headers.values() if len(v) >= 8]
        return sorted({*values, *([self._key] if self._key else [])}, key=len, reverse=True)

    def resolve_base(self, override: str | None) -> str:
        """The base URL for a call. The provider's key travels with the call, so a
        request's `api_endpoint` must be the provider's own base URL or one listed in
        `allowed_endpoints`, whole: origin and path (any path of an allowed origin would
        let a request reach another API of that host with the key, e.g. Ollama's
        `/api/pull?` swallowing the `/api/chat` appended after it), and never with a
        query, fragment or user info."""
        base = self.config.base_url
        if override and override.rstrip("/") != base.rstrip("/"):
            allowed = {endpoint(base), *(endpoint(u) for u in self.config.allowed_endpoints)}
            parts = urlsplit(override)
            if (
                # urlsplit strips leading spaces and controls and drops tabs and line
                # breaks, so such a value compared equal to an allowed one; httpx reads
                # it as a URL without a host, and that error counted against the breaker
                # every agent of this provider shares
                any(c <= " " or c == "\x7f" for c in override)
                or "?" in override  # a query or fragment, even an empty one
                or "#" in override
                or parts.username is not None
                or endpoint(override) not in allowed
            ):
                raise ProviderRequestError(
                    f"{self.name}: api_endpoint {origin(override)}{parts.path} is not an "
                    "allowed endpoint",
                    provider=self.name,
                )
            base = override
        if not base:
            raise ProviderRequestError(f"{self.name}: no base_url configured", provider=self.name)
        return base.rstrip("/")

    async def post_json(
        self,
        url: str,
        body: dict[str, Any],
        headers: dict[str, str],
        timeout_s: float | None,
        params: dict[str, str] | None = None,
    ) -> Any:
        pool = await self.pool()
        try:
            async with pool.lease() as client:
                resp = await client.post(
                    url,
                    json=body,
                    headers=headers,
                    params=params,
                    timeout=self._timeout(timeout_s),
                )
                free_cycle(resp)
        except httpx.HTTPError as exc:
            raise error_for_transport(self.name, exc) from None
        if resp.status_code >= 400:
            raise error_for_status(
                self.name, resp.status_code, self.redact(resp.text), resp.headers
            )
        try:
            return resp.json()
        except ValueError as exc:
            from agentstream.streams.errors import ProviderProtocolError

            raise ProviderProtocolError(
                f"{self.name}: response is not JSON: {exc}", provider=self.name
            ) from None

    @contextlib.asynccontextmanager
    async def open_stream(
        self,
        url: str,
        body: dict[str, Any],
        headers: dict[str, str],
        timeout_s: float | None,
        params: dict[str, str] | None = None,
    ) -> AsyncIterator[httpx.Response]:
        pool = await self.pool()
        resp: httpx.Response | None = None
        try:
            async with (
                pool.lease() as client,
                client.stream(
                    "POST",
                    url,
                    json=body,
                    headers=headers,
                    params=params,
                    timeout=self._timeout(timeout_s),
                ) as resp,
            ):
                if resp.status_code >= 400:
                    text = self.redact((await resp.aread()).decode(errors="replace"))
                    raise error_for_status(self.name, resp.status_code, text, resp.headers)
                yield resp
        except httpx.HTTPError as exc:
            raise error_for_transport(self.name, exc) from None
        finally:
            if resp is not None:
                free_cycle(resp)

    async def check_setup(self) -> bool:
        try:
            await self.initialize()
            if self.config.requires_key and not self._key:
                return False
            async with (await self.pool()).lease() as client:
                resp = await client.get(
                    self.health_url(), headers=self.auth_headers(), timeout=self._timeout(5.0)
                )
                free_cycle(resp)
            return resp.status_code < 500
        except Exception:  # a health probe reports, it never raises
            return False

    def health_url(self) -> str:
        return self.config.base_url

    def auth_headers(self) -> dict[str, str]:
        return dict(self.config.headers)

    async def aclose(self) -> None:
        if self._pool is not None:
            await self._pool.aclose()
            self._pool = None
