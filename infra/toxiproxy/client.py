"""A small synchronous client for Toxiproxy's HTTP API (v2).

PyPI's ``toxiproxy-python`` was last released in January 2019 and is unmaintained,
so this is a thin layer over ``httpx`` (already a project dependency) covering what
the fault-injection suite uses::

    tp = Toxiproxy("http://127.0.0.1:8474")
    proxy = tp.create_proxy("kafka-1", listen="127.0.0.1:29095", upstream="127.0.0.1:29092")
    proxy.latency(300)                 # +300 ms on every response (downstream)
    proxy.disable()                    # blackhole: close the listener and every connection
    proxy.enable()
    with proxy.toxic("bandwidth", {"rate": 64}):  # scoped: removed again on exit
        ...
    tp.reset()                         # every proxy enabled, every toxic removed

Streams: ``downstream`` is broker → client (responses), ``upstream`` client → broker
(requests).  Toxic attributes use Toxiproxy's own units (milliseconds, KB/s).
Calls are blocking but local and quick (a few ms); from async code that is fine,
or use ``asyncio.to_thread``.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Final, Literal

import httpx

from agentstream.infra.toxiproxy.server import DEFAULT_API_PORT, DEFAULT_HOST, ToxiproxyError

__all__ = ["DEFAULT_API_URL", "Proxy", "Stream", "Toxic", "Toxiproxy", "ToxiproxyAPIError"]

DEFAULT_API_URL: Final = f"http://{DEFAULT_HOST}:{DEFAULT_API_PORT}"
Stream = Literal["upstream", "downstream"]


class ToxiproxyAPIError(ToxiproxyError):
    """The API answered with an error status (``status`` holds it: 404, 409, ...)."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Toxic:
    """One toxic as the API describes it."""

    name: str
    type: str
    stream: str
    toxicity: float
    attributes: Mapping[str, Any]

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Toxic:
        """Build from one element of ``GET /proxies/{name}/toxics``."""
        return cls(
            name=str(data["name"]),
            type=str(data["type"]),
            stream=str(data.get("stream", "downstream")),
            toxicity=float(data.get("toxicity", 1.0)),
            attributes=dict(data.get("attributes") or {}),
        )


class Toxiproxy:
    """The server's API: proxies, reset, version.  Usable as a context manager."""

    def __init__(self, api_url: str = DEFAULT_API_URL, *, timeout: float = 5.0) -> None:
        """Connect lazily to ``api_url`` (``http://host:port``)."""
        self.api_url = api_url.rstrip("/")
        self._http = httpx.Client(base_url=self.api_url, timeout=timeout)

    def close(self) -> None:
        """Close the HTTP connection pool."""
        self._http.close()

    def __enter__(self) -> Toxiproxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def request(self, method: str, path: str, json: Any = None) -> Any:
        """One API call; returns the decoded JSON body (``None`` for an empty body)."""
        try:
            response = self._http.request(method, path, json=json)
        except httpx.HTTPError as exc:
            raise ToxiproxyError(f"Toxiproxy API {self.api_url} unreachable: {exc}") from exc
        if response.status_code >= 400:
            raise ToxiproxyAPIError(
                f"{method} {path} -> {response.status_code}: {response.text.strip()}",
                response.status_code,
            )
        if not response.content:
            return None
        try:
            return response.json()
        except ValueError:
            return response.text

    def version(self) -> str:
        """The server's version string (e.g. ``2.12.0``)."""
        body = self.request("GET", "/version")
        return str(body.get("version", body) if isinstance(body, dict) else body).strip()

    def reset(self) -> None:
        """Enable every proxy and remove every toxic (``POST /reset``)."""
        self.request("POST", "/reset")

    def proxies(self) -> dict[str, Proxy]:
        """Every proxy by name."""
        body = self.request("GET", "/proxies") or {}
        return {name: Proxy(self, data) for name, data in body.items()}

    def get_proxy(self, name: str) -> Proxy:
        """One proxy; :class:`ToxiproxyAPIError` (404) when it does not exist."""
        return Proxy(self, self.request("GET", f"/proxies/{name}"))

    def create_proxy(
        self, name: str, *, listen: str, upstream: str, enabled: bool = True, replace: bool = True
    ) -> Proxy:
        """Create proxy ``name`` listening on ``listen`` (``host:port``) → ``upstream``.

        With ``replace`` (default) an existing proxy of that name is deleted first,
        so a test that crashed earlier cannot leave a stale one in the way.
        """
        if replace:
            self.delete_proxy(name, missing_ok=True)
        body = {"name": name, "listen": listen, "upstream": upstream, "enabled": enabled}
        return Proxy(self, self.request("POST", "/proxies", json=body))

    def delete_proxy(self, name: str, *, missing_ok: bool = False) -> None:
        """Delete proxy ``name`` (its listener closes)."""
        try:
            self.request("DELETE", f"/proxies/{name}")
        except ToxiproxyAPIError as exc:
            if not (missing_ok and exc.status == 404):
                raise


class Proxy:
    """One proxy and its toxics.  Attributes reflect the last answer from the API."""

    def __init__(self, client: Toxiproxy, data: Mapping[str, Any]) -> None:
        """Wrap one proxy JSON object as returned by the API."""
        self._client = client
        self.name: str = str(data["name"])
        self.listen: str = str(data["listen"])
        self.upstream: str = str(data["upstream"])
        self.enabled: bool = bool(data.get("enabled", True))

    def __repr__(self) -> str:
        state = "enabled" if self.enabled else "disabled"
        return f"Proxy({self.name!r}, {self.listen} -> {self.upstream}, {state})"

    @property
    def listen_port(self) -> int:
        """The port clients connect to."""
        return int(self.listen.rpartition(":")[2])

    # ------------------------------------------------------------------ enable/disable

    def _update(self, **fields: Any) -> None:
        data = self._client.request("POST", f"/proxies/{self.name}", json=fields)
        self.enabled = bool(data.get("enabled", self.enabled))

    def disable(self) -> None:
        """Blackhole: stop listening and close every open connection through it."""
        self._update(enabled=False)

    def enable(self) -> None:
        """Listen again (connections must be re-established by the clients)."""
        self._update(enabled=True)

    @contextlib.contextmanager
    def disabled(self) -> Iterator[Proxy]:
        """``with proxy.disabled(): ...`` — disabled inside, enabled again on exit."""
        self.disable()
        try:
            yield self
        finally:
            self.enable()

    def delete(self) -> None:
        """Delete this proxy."""
        self._client.delete_proxy(self.name, missing_ok=True)

    # -------------------------------------------------------------------------- toxics

    def toxics(self) -> list[Toxic]:
        """The proxy's current toxics."""
        body = self._client.request("GET", f"/proxies/{self.name}/toxics") or []
        return [Toxic.from_json(item) for item in body]

    def add_toxic(
        self,
        type: str,
        attributes: Mapping[str, Any],
        *,
        stream: Stream = "downstream",
        toxicity: float = 1.0,
        name: str | None = None,
    ) -> Toxic:
        """Add a toxic of any type; returns it (its ``name`` is what removal takes).

        ``toxicity`` is the fraction of connections it applies to.  Default name:
        ``<type>_<stream>_<random>``, so several toxics of one type can coexist.
        """
        body = {
            "name": name or f"{type}_{stream}_{uuid.uuid4().hex[:6]}",
            "type": type,
            "stream": stream,
            "toxicity": toxicity,
            "attributes": dict(attributes),
        }
        return Toxic.from_json(self._client.request("POST", f"/proxies/{self.name}/toxics", body))

    def remove_toxic(self, toxic: Toxic | str) -> None:
        """Remove one toxic (by :class:`Toxic` or name); a missing one is ignored."""
        name = toxic.name if isinstance(toxic, Toxic) else toxic
        try:
            self._client.request("DELETE", f"/proxies/{self.name}/toxics/{name}")
        except ToxiproxyAPIError as exc:
            if exc.status != 404:
                raise

    def clear_toxics(self) -> None:
        """Remove every toxic of this proxy."""
        for toxic in self.toxics():
            self.remove_toxic(toxic)

    def latency(
        self, latency_ms: int, jitter_ms: int = 0, *, stream: Stream = "downstream"
    ) -> Toxic:
        """Delay all data by ``latency_ms`` (± ``jitter_ms``)."""
        return self.add_toxic(
            "latency", {"latency": latency_ms, "jitter": jitter_ms}, stream=stream
        )

    def bandwidth(self, rate_kb_s: int, *, stream: Stream = "downstream") -> Toxic:
        """Limit throughput to ``rate_kb_s`` KB/s."""
        return self.add_toxic("bandwidth", {"rate": rate_kb_s}, stream=stream)

    def reset_peer(self, timeout_ms: int = 0, *, stream: Stream = "downstream") -> Toxic:
        """Reset connections (TCP RST) after ``timeout_ms`` (0: at once)."""
        return self.add_toxic("reset_peer", {"timeout": timeout_ms}, stream=stream)

    def timeout(self, timeout_ms: int = 0, *, stream: Stream = "downstream") -> Toxic:
        """Stop all data; close the connection after ``timeout_ms`` (0: never, a hang)."""
        return self.add_toxic("timeout", {"timeout": timeout_ms}, stream=stream)

    def slow_close(self, delay_ms: int, *, stream: Stream = "downstream") -> Toxic:
        """Delay the TCP close by ``delay_ms``."""
        return self.add_toxic("slow_close", {"delay": delay_ms}, stream=stream)

    @contextlib.contextmanager
    def toxic(
        self,
        type: str,
        attributes: Mapping[str, Any],
        *,
        stream: Stream = "downstream",
        toxicity: float = 1.0,
    ) -> Iterator[Toxic]:
        """``with proxy.toxic("latency", {"latency": 300}): ...`` — removed on exit."""
        added = self.add_toxic(type, attributes, stream=stream, toxicity=toxicity)
        try:
            yield added
        finally:
            self.remove_toxic(added)
