"""The plain-asyncio network backend under the providers' httpx clients, over real
sockets on loopback: plain HTTP and TLS, timeouts, resets, flow control, and that httpx
really uses it (an httpx upgrade that moved the attribute would silently fall back)."""

from __future__ import annotations

import asyncio
import gc
import ssl
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import httpcore
import httpx
import pytest
import uvloop

from agentstream.agents.llm.providers import _net
from agentstream.agents.llm.providers._http import ClientPool, use_asyncio_backend
from agentstream.agents.llm.providers._net import AsyncioBackend
from agentstream.agents.llm.providers.base import ProviderConfig
from agentstream.agents.llm.providers.openai import OpenAICompatibleProvider
from agentstream.schemas.llm import ChatMessage, LLMConfig, LLMContext
from tests.llm_server import LLMServer, Reply
from tests.tls_files import self_signed

BODY = {"model": "m", "stream": True, "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture(autouse=True)
def _reset(server: LLMServer) -> None:
    server.reset(Reply())


def _backend_of(client: httpx.AsyncClient) -> object:
    return client._transport._pool._network_backend  # type: ignore[attr-defined]


async def test_pool_clients_use_the_asyncio_backend_and_reuse_connections(
    server: LLMServer,
) -> None:
    pool = ClientPool(timeout=httpx.Timeout(5))
    try:
        bodies = []
        for _ in range(3):
            async with (
                pool.lease() as client,
                client.stream("POST", server.url + "/v1/chat/completions", json=BODY) as resp,
            ):
                assert isinstance(_backend_of(client), AsyncioBackend)
                bodies.append(b"".join([part async for part in resp.aiter_bytes()]))
                conns = client._transport._pool.connections  # type: ignore[attr-defined]
        assert all(b"data: [DONE]" in body for body in bodies)
        assert b"hello" in bodies[0] and b"loopback" in bodies[0]
        # one kept-alive connection served all three (the idle check did not discard it)
        assert len(conns) == 1 and conns[0]._connection._request_count == 3
    finally:
        await pool.aclose()


def test_streams_the_same_on_uvloop(server: LLMServer) -> None:
    async def main() -> bytes:
        pool = ClientPool(timeout=httpx.Timeout(5))
        try:
            async with (
                pool.lease() as client,
                client.stream("POST", server.url + "/v1/chat/completions", json=BODY) as resp,
            ):
                return b"".join([part async for part in resp.aiter_bytes()])
        finally:
            await pool.aclose()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        body = runner.run(main())
    assert b"loopback" in body and body.rstrip().endswith(b"data: [DONE]")


@pytest.mark.parametrize(
    ("reply", "timeout_s", "errors"),
    [
        # a silent server: a read timeout
        (Reply(kind="hang", after=1), 0.3, (httpx.ReadTimeout,)),
        # a connection dropped mid-body: an error, never a short body taken as whole
        (Reply(kind="drop", after=2), 5.0, (httpx.RemoteProtocolError, httpx.ReadError)),
    ],
    ids=["hang", "drop"],
)
async def test_a_broken_stream_is_an_error(
    server: LLMServer, reply: Reply, timeout_s: float, errors: tuple[type[Exception], ...]
) -> None:
    server.reset(reply)
    pool = ClientPool(timeout=httpx.Timeout(timeout_s))
    try:
        with pytest.raises(errors):
            async with (
                pool.lease() as client,
                client.stream("POST", server.url + "/v1/chat/completions", json=BODY) as resp,
            ):
                async for _ in resp.aiter_bytes():
                    pass
    finally:
        await pool.aclose()


async def test_refused_connection_is_a_connect_error() -> None:
    backend = AsyncioBackend()
    sock = await asyncio.get_running_loop().create_server(asyncio.Protocol, "127.0.0.1", 0)
    port = sock.sockets[0].getsockname()[1]
    sock.close()
    await sock.wait_closed()
    with pytest.raises(httpcore.ConnectError):
        await backend.connect_tcp("127.0.0.1", port, timeout=2)


async def _serve(
    handler: Callable[[asyncio.StreamReader, asyncio.StreamWriter], object],
    ssl_ctx: ssl.SSLContext | None = None,
) -> tuple[asyncio.Server, int]:
    srv = await asyncio.start_server(handler, "127.0.0.1", 0, ssl=ssl_ctx)  # type: ignore[arg-type]
    return srv, srv.sockets[0].getsockname()[1]


async def test_reset_by_peer_while_waiting_is_a_read_error() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1)
        writer.transport.abort()  # RST, not FIN

    srv, port = await _serve(handler)
    try:
        stream = await AsyncioBackend().connect_tcp("127.0.0.1", port, timeout=2)
        await stream.write(b"x")
        # a reset surfaces as ReadError; a close before any byte as b"" (httpcore then
        # reports "server disconnected"): either way never a hang
        try:
            got = await stream.read(100, timeout=2)
        except httpcore.ReadError:
            got = None
        assert got in (None, b"")
        await stream.aclose()
    finally:
        srv.close()
        await srv.wait_closed()


async def test_a_fast_sender_is_paused_not_buffered_without_bound() -> None:
    total = 8 * _net.HIGH_WATER
    block = b"z" * 65536

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for _ in range(total // len(block)):
            writer.write(block)
            await writer.drain()
        writer.close()

    srv, port = await _serve(handler)
    try:
        stream = await AsyncioBackend().connect_tcp("127.0.0.1", port, timeout=2)
        protocol = stream._protocol  # type: ignore[attr-defined]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 5
        while not protocol.reading_paused and loop.time() < deadline:
            await asyncio.sleep(0.01)
        assert protocol.reading_paused
        await asyncio.sleep(0.1)  # the sender keeps trying; we must not keep taking
        assert protocol.buffered <= _net.HIGH_WATER + 4 * 65536
        received = 0
        while chunk := await stream.read(65536, timeout=5):
            assert len(chunk) <= 65536
            received += len(chunk)
        assert received == total
        await stream.aclose()
    finally:
        srv.close()
        await srv.wait_closed()


def _self_signed(tmp: Path) -> tuple[Path, Path]:
    return self_signed(tmp, ("localhost", "127.0.0.1"), stem="cert")


@pytest.fixture
async def tls_server(tmp_path: Path) -> AsyncIterator[tuple[int, Path]]:
    cert_file, key_file = _self_signed(tmp_path)
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert_file, key_file)

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
            writer.close()
            return
        body = b'{"ok": true}'
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        await writer.drain()
        writer.close()

    srv, port = await _serve(handler, ctx)
    try:
        yield port, cert_file
    finally:
        srv.close()
        await srv.wait_closed()


async def test_tls_verifies_the_server_certificate(tls_server: tuple[int, Path]) -> None:
    port, cert_file = tls_server
    trusting = ssl.create_default_context(cafile=str(cert_file))
    client = httpx.AsyncClient(verify=trusting, timeout=5)
    assert use_asyncio_backend(client)
    try:
        resp = await client.get(f"https://localhost:{port}/")
        assert resp.json() == {"ok": True}
        assert resp.extensions["network_stream"].get_extra_info("ssl_object") is not None
    finally:
        await client.aclose()

    # the default trust store does not know this certificate: refused, not ignored
    pool = ClientPool(timeout=httpx.Timeout(5))
    try:
        with pytest.raises(httpx.ConnectError, match=r"(?i)certificate"):
            async with pool.lease() as strict:
                await strict.get(f"https://localhost:{port}/")
    finally:
        await pool.aclose()


async def test_a_finished_call_leaves_no_cyclic_garbage(server: LLMServer) -> None:
    """Every call must be freed by reference counting: cyclic garbage at hundreds of calls
    per second sets off collections that pause the event loop (the LLM stage's tail)."""
    provider = OpenAICompatibleProvider(
        ProviderConfig(name="gc", kind="vllm", base_url=server.url + "/v1")
    )
    ctx = LLMContext(messages=[ChatMessage(role="user", content="hi")])

    async def calls(n: int) -> None:
        for _ in range(n):
            async for _chunk in provider.stream(ctx, LLMConfig(model="m")):
                pass
            await provider.generate(ctx, LLMConfig(model="m"))

    await calls(3)  # connections, caches
    gc.collect()
    gc.disable()
    try:
        await calls(30)
        unreachable = gc.collect()
    finally:
        gc.enable()
        await provider.aclose()
    # before free_cycle: ~40 objects per call (the response, its request, headers …)
    assert unreachable < 60, f"{unreachable} objects in reference cycles after 60 calls"
