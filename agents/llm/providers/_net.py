# ruff: noqa: ASYNC109  (the `timeout` parameters are httpcore's interface)
"""A plain-asyncio network backend for httpcore (the layer under httpx).

httpx's default backend goes through anyio, and every socket read of a streamed body
runs inside ``anyio.fail_after(timeout)``: a cancel scope entered and left per read, plus
anyio's stream wrappers. A streamed completion is one read per token, so at a few
thousand tokens per second that scaffolding was about a quarter of the HTTP client's CPU
(docs/llm.md, "Tests and benchmark"). This backend reads from an `asyncio.Protocol`'s
buffer and times a read out with one `call_later`, and leaves everything above it, HTTP/1.1
parsing, pooling, TLS verification, to httpx and httpcore as before.

It implements httpcore's public `AsyncNetworkBackend` interface. Errors map onto httpcore's
own exceptions (which httpx maps onto its own), exactly as the anyio backend does:

    connect refused / DNS failure  → httpcore.ConnectError   → httpx.ConnectError
    connect or handshake too slow  → httpcore.ConnectTimeout → httpx.ConnectTimeout
    read too slow                  → httpcore.ReadTimeout    → httpx.ReadTimeout
    connection reset while reading → httpcore.ReadError      → httpx.ReadError
    peer closed                    → b"" (httpcore decides whether the body was complete)
    write on a closed connection   → httpcore.WriteError     → httpx.WriteError
"""

from __future__ import annotations

import asyncio
import collections
import ssl
import typing

import httpcore

#: bytes buffered from the socket before the transport stops reading until the reader
#: catches up (a server streaming faster than we parse must not fill memory)
HIGH_WATER = 1 << 20


class _Protocol(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer: collections.deque[bytes] = collections.deque()
        self.buffered = 0
        self.eof = False
        self.error: Exception | None = None
        self.reading_paused = False
        self.writing_paused = False
        self.readable: asyncio.Future[None] | None = None
        self.drained: asyncio.Future[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = typing.cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.buffer.append(data)
        self.buffered += len(data)
        if self.buffered > HIGH_WATER and not self.reading_paused and self.transport:
            self.reading_paused = True
            self.transport.pause_reading()
        _wake(self.readable)

    def eof_received(self) -> bool:
        self.eof = True
        _wake(self.readable)
        return False  # close the transport: HTTP/1.1 never half-closes usefully

    def connection_lost(self, exc: Exception | None) -> None:
        self.eof = True
        self.error = exc
        _wake(self.readable)
        _wake(self.drained)

    def pause_writing(self) -> None:
        self.writing_paused = True

    def resume_writing(self) -> None:
        self.writing_paused = False
        _wake(self.drained)


def _wake(fut: asyncio.Future[None] | None) -> None:
    if fut is not None and not fut.done():
        fut.set_result(None)


def _expire(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_exception(TimeoutError())


async def _wait(fut: asyncio.Future[None], limit_s: float | None, timed_out: Exception) -> None:
    """Wait for `fut`; raise `timed_out` after `limit_s` seconds (None: no limit). One
    timer handle, where `asyncio.wait_for` would wrap the wait in a task."""
    if limit_s is None:
        await fut
        return
    timer = asyncio.get_running_loop().call_later(limit_s, _expire, fut)
    try:
        await fut
    except TimeoutError:
        raise timed_out from None
    finally:
        timer.cancel()


class AsyncioStream(httpcore.AsyncNetworkStream):
    def __init__(self, transport: asyncio.Transport, protocol: _Protocol) -> None:
        self._transport = transport
        self._protocol = protocol
        # read now: asyncio's TLS transport raises on get_extra_info once closed
        self._ssl_object = transport.get_extra_info("ssl_object")

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        p = self._protocol
        if not p.buffer and not p.eof:
            p.readable = asyncio.get_running_loop().create_future()
            try:
                await _wait(p.readable, timeout, httpcore.ReadTimeout("timed out reading"))
            finally:
                p.readable = None
        if not p.buffer:
            if p.error is not None:
                raise httpcore.ReadError(f"connection lost: {p.error}")
            return b""  # closed by the peer
        buf = p.buffer
        # whole chunks up to max_bytes (a token stream: one chunk), splitting only the
        # last one: a backlog is copied once, not once per read
        parts: list[bytes] = []
        size = 0
        while buf and size < max_bytes:
            chunk = buf.popleft()
            if size + len(chunk) > max_bytes:
                cut = max_bytes - size
                buf.appendleft(chunk[cut:])
                chunk = chunk[:cut]
            parts.append(chunk)
            size += len(chunk)
        data = parts[0] if len(parts) == 1 else b"".join(parts)
        p.buffered -= size
        if p.reading_paused and p.buffered <= HIGH_WATER // 2:
            p.reading_paused = False
            self._transport.resume_reading()
        return data

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        if not buffer:
            return
        p = self._protocol
        if self._transport.is_closing():
            raise httpcore.WriteError("connection closed")
        self._transport.write(buffer)
        if p.writing_paused:
            p.drained = asyncio.get_running_loop().create_future()
            try:
                await _wait(p.drained, timeout, httpcore.WriteTimeout("timed out writing"))
            finally:
                p.drained = None
            if p.error is not None or self._transport.is_closing():
                raise httpcore.WriteError(f"connection lost: {p.error}")

    async def aclose(self) -> None:
        self._transport.close()

    async def start_tls(
        self,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        timeout: float | None = None,
    ) -> httpcore.AsyncNetworkStream:
        loop = asyncio.get_running_loop()
        try:
            transport = await asyncio.wait_for(
                loop.start_tls(
                    self._transport,
                    self._protocol,
                    ssl_context,
                    server_hostname=server_hostname,
                ),
                timeout,
            )
        except TimeoutError:
            self._transport.close()
            raise httpcore.ConnectTimeout("timed out in the TLS handshake") from None
        except (OSError, ssl.SSLError) as exc:
            self._transport.close()
            raise httpcore.ConnectError(f"TLS handshake failed: {exc}") from None
        if transport is None:  # the loop's contract allows it when the peer went away
            raise httpcore.ConnectError("connection closed during the TLS handshake")
        self._protocol.transport = transport
        return AsyncioStream(transport, self._protocol)

    def get_extra_info(self, info: str) -> typing.Any:
        if info == "ssl_object":
            return self._ssl_object
        if info in ("client_addr", "server_addr", "socket"):
            name = {"client_addr": "sockname", "server_addr": "peername"}.get(info, info)
            try:
                return self._transport.get_extra_info(name)
            except AttributeError:  # a closed TLS transport
                return None
        if info == "is_readable":
            # httpcore asks this of an idle kept-alive connection: anything readable
            # there (data or a close) means the server is done with it. The protocol has
            # already taken whatever the socket had.
            return bool(self._protocol.buffer) or self._protocol.eof
        return None


class AsyncioBackend(httpcore.AsyncNetworkBackend):
    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: typing.Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        local = (local_address, 0) if local_address else None

        def opener(
            loop: asyncio.AbstractEventLoop, factory: typing.Callable[[], _Protocol]
        ) -> typing.Awaitable[tuple[asyncio.BaseTransport, typing.Any]]:
            if type(loop).__module__.startswith("uvloop"):
                # uvloop has no happy_eyeballs_delay: it tries the addresses in turn
                return loop.create_connection(factory, host, port, local_addr=local)
            # race a host's addresses 250 ms apart (RFC 8305), as anyio's backend does:
            # a silently dropped IPv6 route falls back to IPv4 instead of timing out
            return loop.create_connection(
                factory, host, port, local_addr=local, happy_eyeballs_delay=0.25
            )

        return await _connect(opener, f"{host}:{port}", timeout, socket_options)

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,
        socket_options: typing.Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        return await _connect(
            lambda loop, factory: loop.create_unix_connection(factory, path),
            path,
            timeout,
            socket_options,
        )

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


async def _connect(
    opener: typing.Callable[
        [asyncio.AbstractEventLoop, typing.Callable[[], _Protocol]],
        typing.Awaitable[tuple[asyncio.BaseTransport, typing.Any]],
    ],
    target: str,
    timeout: float | None,
    socket_options: typing.Iterable[httpcore.SOCKET_OPTION] | None,
) -> httpcore.AsyncNetworkStream:
    protocol = _Protocol()
    try:
        transport, _ = await asyncio.wait_for(
            opener(asyncio.get_running_loop(), lambda: protocol), timeout
        )
    except TimeoutError:
        raise httpcore.ConnectTimeout(f"timed out connecting to {target}") from None
    except OSError as exc:
        raise httpcore.ConnectError(f"cannot connect to {target}: {exc}") from None
    _set_options(transport, socket_options)
    return AsyncioStream(typing.cast(asyncio.Transport, transport), protocol)


def _set_options(
    transport: asyncio.BaseTransport,
    options: typing.Iterable[httpcore.SOCKET_OPTION] | None,
) -> None:
    sock = transport.get_extra_info("socket")
    for option in options or ():
        sock.setsockopt(*option)
