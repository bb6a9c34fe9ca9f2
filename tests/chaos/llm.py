"""`llm_saturated`: the LLM stage (`agents.llm`, `call_llm`) at its concurrency limit.

The workers run `agents.security,agents.llm` with one provider, `chaosllm` (kind vllm:
the OpenAI wire format), pointed at `SaturatingServer`, the loopback server of
tests/llm_server.py run in this process, and limited to `SLOTS` concurrent calls per
worker (the provider's `max_concurrency`). While saturated the server answers every call
slowly (`CALL_S` before the first word) and a share (`RATE_LIMITED`) at once with 429 and
a short Retry-After, which call_llm honours while it keeps the slot; the requests
(`LlmLoad`, one per `LLM_EVERY` agent.messages, at the same pace) arrive faster than the
slots can serve them, so every slot stays busy, the agent stops taking requests
(backpressure) and the rest wait in Kafka. Once the load is issued the server answers at
once again and the backlog drains.

The worker settings make a 429 something to wait for, not a reason to give up: up to
`MAX_ATTEMPTS` attempts per request and a circuit breaker that does not open on them (it
would fail the waiting requests at once and free the slots: not saturation any more).

`LlmSaturation` (the run's hooks) starts the server, its collector and its load, adds
the drain condition (every request has its final response) and checks the requests
against their responses with `checker.check_llm`, and the server's concurrency: the most
calls it saw at once must reach the limit (saturated) and never exceed it.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import random
import threading
import time
from typing import Any

from aiohttp import web

from tests.chaos import checker
from tests.chaos.collect import LlmCollector, stop_task
from tests.chaos.harness import COMMIT_INTERVAL_S, RunContext, RunHooks
from tests.chaos.load import LlmLoad
from tests.support import await_until

# tests/llm_server.py imported by name: a plain import would have mypy check that module,
# which is outside the typed packages and does not pass (an unannotated dict, line 263;
# `u: dict[str, Any] = ...` fixes it, then this can be `from tests.llm_server import ...`)
_llm_server = importlib.import_module("tests.llm_server")
LLMServer: Any = _llm_server.LLMServer
Reply: Any = _llm_server.Reply

PROVIDER = "chaosllm"
#: the provider's max_concurrency: concurrent calls per worker
SLOTS = 4
#: seconds a saturated server waits before the first word of an answer
CALL_S = 0.8
#: share of the calls a saturated server answers 429 (Retry-After RETRY_AFTER_S)
RATE_LIMITED = 0.25
RETRY_AFTER_S = "0.3"
#: one LLM request per this many agent.messages, at the same pace
LLM_EVERY = 20
MIN_LLM_REQUESTS = 40
#: attempts per request: a request fails only after this many 429s in a row
#: (RATE_LIMITED ** MAX_ATTEMPTS of them, ~2e-5)
MAX_ATTEMPTS = 8
#: the share of requests that must complete (the rest may fail, typed)
MIN_COMPLETED = 0.95
#: the provider must be at its slot limit in at least this share of the samples taken
#: while the load ran (the recorded runs: 0.60-0.65); one moment at the limit is no
#: saturation
MIN_SHARE_AT_LIMIT = 0.3

WORDS = ["chaos", "answer", "from", "the", "loopback", "model"]


class SaturatingServer(LLMServer):
    """The loopback LLM server, slow and 429-ing while `saturated`, fast otherwise; it
    counts the calls in progress (`inflight`, `max_inflight`)."""

    def __init__(self, seed: int) -> None:
        super().__init__(Reply(words=WORDS))
        self.saturated = False
        self._rng = random.Random(seed)
        self._slow = Reply(words=WORDS, first_delay_s=CALL_S, chunk_delay_s=0.01)
        self._limited = Reply(kind="status", status=429, retry_after=RETRY_AFTER_S)
        self._count = threading.Lock()
        self.inflight = 0
        self.max_inflight = 0
        self.calls = 0
        self.rate_limited = 0

    def _next(self) -> Reply:
        with self._lock:
            if not self.saturated:
                return self.default
            if self._rng.random() < RATE_LIMITED:
                self.rate_limited += 1
                return self._limited
            return self._slow

    async def _openai(self, request: web.Request) -> web.StreamResponse:
        with self._count:
            self.calls += 1
            self.inflight += 1
            self.max_inflight = max(self.max_inflight, self.inflight)
        try:
            return await super()._openai(request)
        finally:
            with self._count:
                self.inflight -= 1


class LlmSaturation(RunHooks):
    """The run's LLM stage: server, providers file and worker settings, load, collector,
    drain condition and check (see the module docstring)."""

    def __init__(self) -> None:
        self.server: SaturatingServer | None = None
        self.collector: LlmCollector | None = None
        self.load: LlmLoad | None = None
        self.load_task: asyncio.Task[None] | None = None
        #: calls in progress at the server, sampled while saturated
        self.samples: list[int] = []
        self.saturated_s = 0.0
        #: calls at once the provider may see: SLOTS per worker
        self.limit = SLOTS

    # -- hooks ---------------------------------------------------------------------------
    async def setup(self, ctx: RunContext) -> None:
        self.limit = SLOTS * len(ctx.workers)
        self.server = server = SaturatingServer(ctx.rng.randrange(1 << 30))
        await asyncio.to_thread(server.start)
        providers = ctx.opts.out_dir.resolve() / "providers.yaml"
        providers.write_text(
            "providers:\n"
            f"  {PROVIDER}: {{kind: vllm, base_url: '{server.url}/v1', "
            f"max_concurrency: {SLOTS}}}\n"
        )
        settings = {
            "AGENTSTREAM_AGENTS": "security,llm",
            "AGENTSTREAM_LLM_PROVIDERS_FILE": str(providers),
            "AGENTSTREAM_LLM_DEFAULT_PROVIDER": PROVIDER,
            "AGENTSTREAM_LLM_MAX_ATTEMPTS": str(MAX_ATTEMPTS),
            "AGENTSTREAM_LLM_BACKOFF_BASE_S": "0.1",
            "AGENTSTREAM_LLM_BREAKER_FAILURES": "1000000",
        }
        for w in ctx.workers:
            w.env.update(settings)
        prefix = f"{ctx.ns}."
        self.collector = await LlmCollector(ctx.opts.bootstrap, prefix).start()
        total = max(MIN_LLM_REQUESTS, ctx.opts.messages // LLM_EVERY)
        self.load = LlmLoad(
            bootstrap=ctx.opts.bootstrap,
            topic=self.collector.request_topic,
            total=total,
            rate=ctx.opts.rate / LLM_EVERY,
            tag=ctx.ns,
            provider=PROVIDER,
        )
        ctx.log("llm stage", provider=PROVIDER, url=server.url, slots=SLOTS, requests=total)

    def start_load(self) -> LlmLoad:
        assert self.load is not None
        self.load_task = asyncio.create_task(self.load.run())
        return self.load

    async def saturate(self, until: asyncio.Future[Any]) -> None:
        """Saturate the server until `until` is done, sampling its calls in progress."""
        server = self.server
        assert server is not None
        server.saturated = True
        t0 = time.monotonic()
        try:
            while not until.done():
                self.samples.append(server.inflight)
                await asyncio.wait({until}, timeout=0.25)
        finally:
            server.saturated = False
            self.saturated_s = time.monotonic() - t0

    def drained(self, ctx: RunContext) -> bool:
        load, col = self.load, self.collector
        if load is None or col is None or self.load_task is None or not self.load_task.done():
            return False
        return col.pending(load.total) == 0

    async def check(self, ctx: RunContext) -> dict[str, Any]:
        col, load, server = self.collector, self.load, self.server
        if col is None or load is None or server is None:
            return {"llm": {"failures": ["the LLM stage was not set up"]}}
        # the requests' outputs are final once the workers stopped: read what is left
        with contextlib.suppress(AssertionError):
            await await_until(lambda: time.time() - col.last_response_at > 2.0, 10, 0.5)
        span = (col.last_response_at or time.time()) - (load.started_at or ctx.t0)
        throughput = len(col.ended_ids) / max(1e-3, span)
        res = checker.check_llm(
            col.requests,
            col.responses,
            col.dead_letters,
            guarantee=ctx.opts.guarantee,
            request_topic=col.request_topic,
            faults=len(ctx.faults),
            throughput_rps=round(throughput, 2),
            commit_interval_s=COMMIT_INTERVAL_S,
            min_completed_share=MIN_COMPLETED,
        )
        out = res.to_dict()
        failures = out["failures"]
        restarted = any(w.starts > 1 for w in ctx.workers)
        if server.max_inflight > self.limit:
            text = f"{server.max_inflight} calls at once at the provider, above the limit of " + (
                f"{self.limit} ({SLOTS} per worker)"
            )
            if restarted:  # a dead worker's calls run on at the server for a while
                out["warnings"].append(text + " — a worker restarted meanwhile")
            else:
                failures.append(text)
        if server.max_inflight < self.limit:
            failures.append(
                f"the provider saw at most {server.max_inflight} calls at once, never the "
                f"limit of {self.limit}: the stage was not saturated"
            )
        at_limit = sum(1 for n in self.samples if n >= self.limit)
        share = at_limit / len(self.samples) if self.samples else 0.0
        if share < MIN_SHARE_AT_LIMIT:
            failures.append(
                f"the provider was at its limit in {share:.0%} of the samples (at least "
                f"{MIN_SHARE_AT_LIMIT:.0%} asked): the stage was hardly saturated"
            )
        out.update(
            {
                "load": {"acked": load.acked, "resent": load.resent, "unsent": load.unsent},
                "server": {
                    "calls": server.calls,
                    "rate_limited": server.rate_limited,
                    "max_inflight": server.max_inflight,
                    "limit": self.limit,
                    "saturated_s": round(self.saturated_s, 1),
                    "samples_at_limit": round(share, 3),
                },
                "garbage": dict(col.garbage),
            }
        )
        out["ok"] = not failures
        ctx.note(
            f"llm_saturated: {res.requests} request(s), final responses {res.by_status}, "
            f"lost {res.lost}, duplicates {res.duplicates} (at-least-once bound "
            f"{'-' if res.dup_bound is None else f'{res.dup_bound:.0f}'}), dead-lettered "
            f"{res.dead_lettered}; provider: {server.calls} call(s), {server.rate_limited} "
            f"answered 429, at most {server.max_inflight} at once (limit {self.limit}), at "
            f"the limit in {share:.0%} of the samples over {self.saturated_s:.0f}s saturated"
        )
        for w in res.warnings:
            ctx.note(f"llm: {w}")
        return {"llm": out}

    async def teardown(self, ctx: RunContext) -> None:
        task, self.load_task = self.load_task, None
        if task is not None and not task.done():
            await stop_task(task)
        if self.collector is not None:
            await self.collector.stop()
        if self.server is not None:
            await asyncio.to_thread(self.server.stop)
