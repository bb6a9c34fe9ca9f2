"""What HTTP providers share: one httpx client per provider, error mapping, Retry-After."""

from __future__ import annotations

import contextlib
import email.utils
import time
from collections.abc import AsyncIterator
from datetime import UTC
from typing import Any
from urllib.parse import urlsplit

import httpx

from agents.llm.providers.base import LLMProvider, ProviderConfig, SecretSource
from streams.errors import (
    ProviderConnectionError,
    ProviderError,
    ProviderRateLimited,
    ProviderRequestError,
    ProviderServerError,
    ProviderTimeout,
)

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
        return ProviderServerError(msg, provider=provider, status_code=status)
    return ProviderRequestError(msg, provider=provider, status_code=status)


def error_for_transport(provider: str, exc: httpx.HTTPError) -> ProviderError:
    # httpx messages carry no headers, so no key can leak through them
    detail = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    if isinstance(exc, httpx.TimeoutException):
        return ProviderTimeout(f"{provider}: timed out ({detail})", provider=provider)
    return ProviderConnectionError(f"{provider}: {detail}", provider=provider)


def origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}".lower()


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
        self._client: httpx.AsyncClient | None = None
        self._key: str | None = None
        self._key_loaded = False

    async def initialize(self) -> None:
        if self._client is None:
            self._client = httpx.AsyncClient(
                transport=self._transport,
                limits=httpx.Limits(max_connections=None, max_keepalive_connections=256),
                timeout=self._timeout(None),
            )
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

    async def client(self) -> httpx.AsyncClient:
        if self._client is None or (self.config.requires_key and not self._key_loaded):
            await self.initialize()
        assert self._client is not None
        return self._client

    def api_key(self) -> str | None:
        if self.config.requires_key and not self._key:
            raise ProviderRequestError(
                f"{self.name}: no API key in the keychain under llm.{self.name}.api_key",
                provider=self.name,
            )
        return self._key

    def resolve_base(self, override: str | None) -> str:
        """The base URL for a call; a request may only redirect to allowed origins, since
        the provider's key travels with the call."""
        base = self.config.base_url
        if override and override.rstrip("/") != base.rstrip("/"):
            allowed = {origin(base), *(origin(u) for u in self.config.allowed_endpoints)}
            if origin(override) not in allowed:
                raise ProviderRequestError(
                    f"{self.name}: api_endpoint {origin(override)} is not an allowed endpoint",
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
        client = await self.client()
        try:
            resp = await client.post(
                url, json=body, headers=headers, params=params, timeout=self._timeout(timeout_s)
            )
        except httpx.HTTPError as exc:
            raise error_for_transport(self.name, exc) from None
        if resp.status_code >= 400:
            raise error_for_status(self.name, resp.status_code, resp.text, resp.headers)
        try:
            return resp.json()
        except ValueError as exc:
            from streams.errors import ProviderProtocolError

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
        client = await self.client()
        try:
            async with client.stream(
                "POST",
                url,
                json=body,
                headers=headers,
                params=params,
                timeout=self._timeout(timeout_s),
            ) as resp:
                if resp.status_code >= 400:
                    text = (await resp.aread()).decode(errors="replace")
                    raise error_for_status(self.name, resp.status_code, text, resp.headers)
                yield resp
        except httpx.HTTPError as exc:
            raise error_for_transport(self.name, exc) from None

    async def check_setup(self) -> bool:
        try:
            await self.initialize()
            if self.config.requires_key and not self._key:
                return False
            client = await self.client()
            resp = await client.get(
                self.health_url(), headers=self.auth_headers(), timeout=self._timeout(5.0)
            )
            return resp.status_code < 500
        except Exception:  # a health probe reports, it never raises
            return False

    def health_url(self) -> str:
        return self.config.base_url

    def auth_headers(self) -> dict[str, str]:
        return dict(self.config.headers)

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None
