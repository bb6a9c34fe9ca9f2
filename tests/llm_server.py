"""A real HTTP server on loopback speaking the OpenAI-compatible, Ollama and Anthropic
Messages chat protocols.

    with LLMServer() as srv:
        srv.script(Reply(kind="status", status=429, retry_after="1"), Reply())
        ... point a provider at srv.url + "/v1" (OpenAI) or srv.url (Ollama) ...
        srv.requests  # what arrived: path, query, headers, JSON body

It runs aiohttp in its own thread with its own event loop, so it keeps answering while a
test blocks (e.g. waiting for a worker subprocess). Each request takes the next scripted
`Reply` (or `default` when the script is empty): a normal answer (JSON, SSE or NDJSON
depending on the path and `stream`), an error status with optional Retry-After, a hang,
a connection dropped mid-stream, malformed SSE, a stream without usage or without
[DONE]. `aborted` counts streams the client closed before the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Literal

from aiohttp import web

Kind = Literal["ok", "status", "hang", "drop", "malformed", "no_done", "error_event"]


@dataclass
class Call:
    """A tool call the scripted model makes: its arguments are streamed in `fragments`
    (joined, they are the arguments; Ollama and whole answers get them joined)."""

    id: str
    name: str
    fragments: list[str]

    @property
    def arguments(self) -> str:
        return "".join(self.fragments)


@dataclass
class Reply:
    kind: Kind = "ok"
    status: int = 200
    retry_after: str | None = None
    words: list[str] = field(default_factory=lambda: ["hello", "from", "the", "loopback"])
    usage: bool = True
    chunk_delay_s: float = 0.0
    #: extra wait before the first word: a hosted model's time to first token
    first_delay_s: float = 0.0
    #: hang / drop: after this many streamed words
    after: int = 2
    body: str = '{"error": {"message": "scripted failure"}}'
    #: tool calls after the words (OpenAI: their fragments interleaved across calls)
    calls: list[Call] = field(default_factory=list)
    #: Anthropic: the stop_reason (default: tool_use with calls, else end_turn)
    stop_reason: str | None = None


@dataclass
class Seen:
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: Any
    at: float


class LLMServer:
    def __init__(self, default: Reply | None = None) -> None:
        self.default = default or Reply()
        self._script: list[Reply] = []
        self._lock = threading.Lock()
        self.requests: list[Seen] = []
        self.aborted = 0
        self.completed = 0
        self.port = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def script(self, *replies: Reply) -> None:
        with self._lock:
            self._script.extend(replies)

    def reset(self, default: Reply | None = None) -> None:
        with self._lock:
            self._script.clear()
            self.requests.clear()
            self.aborted = self.completed = 0
            if default is not None:
                self.default = default

    def _next(self) -> Reply:
        with self._lock:
            return self._script.pop(0) if self._script else self.default

    # -- lifecycle -----------------------------------------------------------------------
    def __enter__(self) -> LLMServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> LLMServer:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        return self.start_on(port)

    def start_on(self, port: int) -> LLMServer:
        self.port = port
        self._thread = threading.Thread(target=self._run, name="llm-server", daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("loopback LLM server did not start")
        return self

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        if self._thread is not None:
            self._thread.join(10)

    def _run(self) -> None:
        loop = self._loop = asyncio.new_event_loop()
        loop.run_until_complete(self._serve())
        loop.close()

    async def _serve(self) -> None:
        self._stop = asyncio.Event()
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._openai)
        # a second OpenAI base URL on the same host (a provider's `allowed_endpoints`)
        app.router.add_post("/eu/v1/chat/completions", self._openai)
        app.router.add_post("/openai/deployments/{deployment}/chat/completions", self._openai)
        app.router.add_post("/api/chat", self._ollama)
        app.router.add_post("/v1/messages", self._anthropic)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/api/tags", self._models)
        app.router.add_get("/search", self._search)
        runner = web.AppRunner(app, handle_signals=False, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", self.port, backlog=1024)
        await site.start()
        self._ready.set()
        await self._stop.wait()
        await runner.cleanup()

    # -- handlers ------------------------------------------------------------------------
    async def _models(self, request: web.Request) -> web.Response:
        return web.json_response({"data": [{"id": "loop-model"}]})

    async def _search(self, request: web.Request) -> web.Response:
        """SearxNG-style JSON search: one result per word of the query."""
        with self._lock:
            self.requests.append(
                Seen(
                    request.path, dict(request.query), dict(request.headers), None, time.monotonic()
                )
            )
        if request.query.get("q") == "fail":
            return web.Response(status=502, text="upstream down")
        words = request.query.get("q", "").split()
        results = [
            {
                "title": f"About {w}",
                "url": f"https://example.org/{w}",
                "content": f"{w} explained at length",
            }
            for w in words
        ]
        return web.json_response({"query": request.query.get("q"), "results": results})

    async def _record(self, request: web.Request) -> Any:
        raw = await request.read()
        try:
            body = json.loads(raw)
        except ValueError:
            body = None
        with self._lock:
            self.requests.append(
                Seen(
                    request.path, dict(request.query), dict(request.headers), body, time.monotonic()
                )
            )
        return body

    async def _error_or_hang(self, reply: Reply) -> web.Response | None:
        if reply.kind == "status":
            headers = {"Retry-After": reply.retry_after} if reply.retry_after else {}
            return web.Response(
                status=reply.status,
                text=reply.body,
                content_type="application/json",
                headers=headers,
            )
        return None

    async def _hang(self, request: web.Request) -> None:
        """Send nothing more until the client goes away (aiohttp does not cancel a
        handler on disconnect, so watch the transport)."""
        while request.transport is not None and not request.transport.is_closing():
            await asyncio.sleep(0.01)
        with self._lock:
            self.aborted += 1

    async def _openai(self, request: web.Request) -> web.StreamResponse:
        body = await self._record(request)
        reply = self._next()
        early = await self._error_or_hang(reply) if reply.kind in ("status",) else None
        if early is not None:
            return early
        model = (body or {}).get("model") or request.match_info.get("deployment", "loop-model")
        prompt_tokens = 7
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": len(reply.words),
            "total_tokens": prompt_tokens + len(reply.words),
        }
        if not (body or {}).get("stream"):
            if reply.kind == "hang":
                await self._hang(request)
                return web.Response(status=499)
            await asyncio.sleep(reply.first_delay_s + reply.chunk_delay_s * len(reply.words))
            payload: dict[str, Any] = {
                "id": "cmpl-1",
                "object": "chat.completion",
                "model": model,
                "choices": [
                    {
                        "index": 0,
                        "finish_reason": "tool_calls" if reply.calls else "stop",
                        "message": {
                            "role": "assistant",
                            "content": " ".join(reply.words) or None,
                            **(
                                {
                                    "tool_calls": [
                                        {
                                            "id": c.id,
                                            "type": "function",
                                            "function": {"name": c.name, "arguments": c.arguments},
                                        }
                                        for c in reply.calls
                                    ]
                                }
                                if reply.calls
                                else {}
                            ),
                        },
                    }
                ],
            }
            if reply.usage:
                payload["usage"] = usage
            self.completed += 1
            return web.json_response(payload)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        try:
            for i, word in enumerate(reply.words):
                if reply.kind in ("hang", "drop") and i == reply.after:
                    if reply.kind == "hang":
                        await self._hang(request)
                        return resp
                    assert request.transport is not None
                    request.transport.close()  # mid-stream, no terminating chunk
                    return resp
                if reply.chunk_delay_s or (i == 0 and reply.first_delay_s):
                    await asyncio.sleep(
                        reply.chunk_delay_s + (reply.first_delay_s if i == 0 else 0)
                    )
                delta = word if i == 0 else " " + word
                event = {
                    "id": "cmpl-1",
                    "model": model,
                    "choices": [{"index": 0, "delta": {"content": delta}, "finish_reason": None}],
                }
                await resp.write(b"data: " + json.dumps(event).encode() + b"\n\n")
                if reply.kind == "malformed" and i == 0:
                    await resp.write(b"data: {this is not json\n\n")
            for piece in openai_tool_deltas(reply.calls):
                event = {
                    "id": "cmpl-1",
                    "model": model,
                    "choices": [
                        {"index": 0, "delta": {"tool_calls": [piece]}, "finish_reason": None}
                    ],
                }
                await resp.write(b"data: " + json.dumps(event).encode() + b"\n\n")
            await resp.write(b": keep-alive comment\n\n")
            final = {
                "id": "cmpl-1",
                "model": model,
                "choices": [
                    {
                        "index": 0,
                        "delta": {},
                        "finish_reason": "tool_calls" if reply.calls else "stop",
                    }
                ],
            }
            await resp.write(b"data: " + json.dumps(final).encode() + b"\n\n")
            if reply.usage and ((body or {}).get("stream_options") or {}).get("include_usage"):
                u = {"id": "cmpl-1", "model": model, "choices": [], "usage": usage}
                await resp.write(b"data: " + json.dumps(u).encode() + b"\n\n")
            if reply.kind != "no_done":
                await resp.write(b"data: [DONE]\n\n")
            await resp.write_eof()
            self.completed += 1
        except (asyncio.CancelledError, ConnectionResetError):
            with self._lock:
                self.aborted += 1
            raise
        return resp

    async def _ollama(self, request: web.Request) -> web.StreamResponse:
        body = await self._record(request)
        reply = self._next()
        early = await self._error_or_hang(reply) if reply.kind == "status" else None
        if early is not None:
            return early
        model = (body or {}).get("model") or "loop-model"
        counts = {"prompt_eval_count": 9, "eval_count": len(reply.words)} if reply.usage else {}
        if not (body or {}).get("stream", True):
            if reply.kind == "hang":
                await self._hang(request)
                return web.Response(status=499)
            self.completed += 1
            return web.json_response(
                {
                    "model": model,
                    "done": True,
                    "done_reason": "stop",
                    "message": {
                        "role": "assistant",
                        "content": " ".join(reply.words),
                        **ollama_calls(reply.calls),
                    },
                    **counts,
                }
            )
        resp = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await resp.prepare(request)
        try:
            for i, word in enumerate(reply.words):
                if reply.kind in ("hang", "drop") and i == reply.after:
                    if reply.kind == "hang":
                        await self._hang(request)
                        return resp
                    assert request.transport is not None
                    request.transport.close()
                    return resp
                if reply.chunk_delay_s or (i == 0 and reply.first_delay_s):
                    await asyncio.sleep(
                        reply.chunk_delay_s + (reply.first_delay_s if i == 0 else 0)
                    )
                delta = word if i == 0 else " " + word
                line = {
                    "model": model,
                    "message": {"role": "assistant", "content": delta},
                    "done": False,
                }
                await resp.write(json.dumps(line).encode() + b"\n")
                if reply.kind == "malformed" and i == 0:
                    await resp.write(b"{not json\n")
            for call in reply.calls:  # Ollama sends each call whole, a line each
                line = {
                    "model": model,
                    "message": {"role": "assistant", "content": "", **ollama_calls([call])},
                    "done": False,
                }
                await resp.write(json.dumps(line).encode() + b"\n")
            if reply.kind != "no_done":
                last = {
                    "model": model,
                    "message": {"role": "assistant", "content": ""},
                    "done": True,
                    "done_reason": "stop",
                    **counts,
                }
                await resp.write(json.dumps(last).encode() + b"\n")
            await resp.write_eof()
            self.completed += 1
        except (asyncio.CancelledError, ConnectionResetError):
            with self._lock:
                self.aborted += 1
            raise
        return resp

    async def _anthropic(self, request: web.Request) -> web.StreamResponse:
        """Anthropic's Messages API: JSON, or SSE with named events as it sends them."""
        body = await self._record(request)
        reply = self._next()
        if reply.kind == "status":
            headers = {"retry-after": reply.retry_after} if reply.retry_after else {}
            kind = "overloaded_error" if reply.status == 529 else "api_error"
            err = {"type": "error", "error": {"type": kind, "message": "scripted failure"}}
            return web.json_response(err, status=reply.status, headers=headers)
        model = (body or {}).get("model") or "loop-model"
        stop = reply.stop_reason or ("tool_use" if reply.calls else "end_turn")
        usage_in = {"input_tokens": 11, "cache_read_input_tokens": 2}
        if not (body or {}).get("stream"):
            content: list[dict[str, Any]] = []
            if reply.words:
                content.append({"type": "text", "text": " ".join(reply.words)})
            content += [
                {"type": "tool_use", "id": c.id, "name": c.name, "input": json.loads(c.arguments)}
                for c in reply.calls
            ]
            self.completed += 1
            return web.json_response(
                {
                    "id": "msg_1",
                    "type": "message",
                    "role": "assistant",
                    "model": model,
                    "content": content,
                    "stop_reason": stop,
                    "usage": {**usage_in, "output_tokens": len(reply.words)},
                }
            )
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)

        async def send(name: str, data: dict[str, Any]) -> None:
            await resp.write(f"event: {name}\ndata: {json.dumps(data)}\n\n".encode())

        try:
            await send(
                "message_start",
                {
                    "type": "message_start",
                    "message": {
                        "id": "msg_1",
                        "type": "message",
                        "role": "assistant",
                        "model": model,
                        "content": [],
                        "stop_reason": None,
                        "usage": {**usage_in, "output_tokens": 1},
                    },
                },
            )
            block = 0
            if reply.words:
                await send(
                    "content_block_start",
                    {
                        "type": "content_block_start",
                        "index": 0,
                        "content_block": {"type": "text", "text": ""},
                    },
                )
                await send("ping", {"type": "ping"})
                for i, word in enumerate(reply.words):
                    if reply.kind in ("hang", "drop", "error_event") and i == reply.after:
                        if reply.kind == "hang":
                            await self._hang(request)
                            return resp
                        if reply.kind == "error_event":
                            await send(
                                "error",
                                {
                                    "type": "error",
                                    "error": {"type": "overloaded_error", "message": "Overloaded"},
                                },
                            )
                            await resp.write_eof()
                            return resp
                        assert request.transport is not None
                        request.transport.close()
                        return resp
                    if reply.chunk_delay_s or (i == 0 and reply.first_delay_s):
                        await asyncio.sleep(
                            reply.chunk_delay_s + (reply.first_delay_s if i == 0 else 0)
                        )
                    await send(
                        "content_block_delta",
                        {
                            "type": "content_block_delta",
                            "index": 0,
                            "delta": {"type": "text_delta", "text": word if i == 0 else " " + word},
                        },
                    )
                    if reply.kind == "malformed" and i == 0:
                        await resp.write(b"event: content_block_delta\ndata: {not json\n\n")
                await send("content_block_stop", {"type": "content_block_stop", "index": 0})
                block = 1
            # an event type this client does not know: Anthropic may add some, and they
            # are to be ignored
            await send("future_event", {"type": "future_event", "detail": {"x": 1}})
            for call in reply.calls:
                await send(
                    "content_block_start",
                    {
                        "type": "content_block_start",
                        "index": block,
                        "content_block": {
                            "type": "tool_use",
                            "id": call.id,
                            "name": call.name,
                            "input": {},
                        },
                    },
                )
                for fragment in call.fragments:
                    await send(
                        "content_block_delta",
                        {
                            "type": "content_block_delta",
                            "index": block,
                            "delta": {"type": "input_json_delta", "partial_json": fragment},
                        },
                    )
                await send("content_block_stop", {"type": "content_block_stop", "index": block})
                block += 1
            await send(
                "message_delta",
                {
                    "type": "message_delta",
                    "delta": {"stop_reason": stop, "stop_sequence": None},
                    "usage": {"output_tokens": len(reply.words) + len(reply.calls)}
                    if reply.usage
                    else {},
                },
            )
            if reply.kind != "no_done":
                await send("message_stop", {"type": "message_stop"})
            await resp.write_eof()
            self.completed += 1
        except (asyncio.CancelledError, ConnectionResetError):
            with self._lock:
                self.aborted += 1
            raise
        return resp


def openai_tool_deltas(calls: list[Call]) -> list[dict[str, Any]]:
    """OpenAI's streamed tool-call pieces: each call's first piece (index, id, name, empty
    arguments), then the fragments round-robin across calls, so two parallel calls are
    interleaved as OpenAI streams them."""
    out: list[dict[str, Any]] = [
        {"index": i, "id": c.id, "type": "function", "function": {"name": c.name, "arguments": ""}}
        for i, c in enumerate(calls)
    ]
    longest = max((len(c.fragments) for c in calls), default=0)
    for k in range(longest):
        for i, c in enumerate(calls):
            if k < len(c.fragments):
                out.append({"index": i, "function": {"arguments": c.fragments[k]}})
    return out


def ollama_calls(calls: list[Call]) -> dict[str, Any]:
    if not calls:
        return {}
    return {
        "tool_calls": [
            {"function": {"name": c.name, "arguments": json.loads(c.arguments)}} for c in calls
        ]
    }


def main() -> None:
    """``python -m tests.llm_server --port N [--words 8] [--delay 0.005] [--first-delay 0.1]``:
    serve until killed (the benchmark runs it in its own process so that the server does not
    share a GIL with the client it is measured against)."""
    import argparse
    import signal

    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--words", type=int, default=8)
    p.add_argument("--delay", type=float, default=0.0, help="seconds before each word")
    p.add_argument("--first-delay", type=float, default=0.0, help="extra before the first")
    args = p.parse_args()
    srv = LLMServer(
        Reply(
            words=[f"w{i}" for i in range(args.words)],
            chunk_delay_s=args.delay,
            first_delay_s=args.first_delay,
        )
    )
    srv.start_on(args.port)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    print(f"listening on {srv.url}", flush=True)
    with contextlib.suppress(KeyboardInterrupt):
        stop.wait()
    srv.stop()


if __name__ == "__main__":
    main()
