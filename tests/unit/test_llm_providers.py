"""Provider wire behaviour against the real loopback HTTP server (no Kafka)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path

import pytest

from agentstream.agents.llm.providers.base import LLMProvider, ProviderConfig, StreamChunk
from agentstream.agents.llm.providers.local import LocalProvider
from agentstream.agents.llm.providers.ollama import OllamaProvider
from agentstream.agents.llm.providers.openai import OpenAICompatibleProvider
from agentstream.agents.llm.registry import LLMRegistry, keychain_secret, load_providers_file
from agentstream.schemas.llm import ChatMessage, LLMConfig, LLMContext
from agentstream.streams.errors import (
    ProviderConnectionError,
    ProviderError,
    ProviderProtocolError,
    ProviderRateLimited,
    ProviderRequestError,
    ProviderServerError,
    ProviderTimeout,
)
from agentstream.streams.settings import Settings, SettingsError
from tests.llm_server import LLMServer, Reply
from tests.support import await_until

CTX = LLMContext(
    messages=[ChatMessage(role="user", content="Say hello")], system_prompt="Be brief."
)
CFG = LLMConfig(
    model="m1",
    temperature=0.3,
    max_tokens=50,
    top_p=0.9,
    frequency_penalty=0.1,
    presence_penalty=0.2,
    stop=["\n\n"],
    organization="org-7",
)


@pytest.fixture(autouse=True)
def _reset(server: LLMServer) -> None:
    server.reset(Reply())


async def secret(name: str) -> str | None:
    return {"llm.oa.api_key": "sk-test-123", "llm.az.api_key": "az-key-9"}.get(name)


def openai(server: LLMServer, **kw: object) -> OpenAICompatibleProvider:
    kw.setdefault("allowed_organizations", ["org-7"])  # CFG's
    cfg = ProviderConfig(
        name="oa", kind="openai", base_url=server.url + "/v1", requires_key=True, **kw
    )  # type: ignore[arg-type]
    return OpenAICompatibleProvider(cfg, secrets=secret)


def ollama(server: LLMServer) -> OllamaProvider:
    return OllamaProvider(ProviderConfig(name="ol", kind="ollama", base_url=server.url))


async def collect(provider: LLMProvider, timeout_s: float | None = None) -> list[StreamChunk]:
    out = []
    async for chunk in provider.stream(CTX, CFG, timeout_s=timeout_s):
        out.append(chunk)
    await provider.aclose()
    return out


async def test_openai_json_sends_every_config_field_and_the_key(server: LLMServer) -> None:
    p = openai(server)
    result = await p.generate(CTX, CFG)
    await p.aclose()
    assert result.content == "hello from the loopback"
    assert result.usage is not None and result.usage.completion_tokens == 4
    assert not result.usage.estimated
    seen = server.requests[-1]
    assert seen.path == "/v1/chat/completions"
    assert seen.headers["Authorization"] == "Bearer sk-test-123"
    assert seen.headers["OpenAI-Organization"] == "org-7"
    body = seen.body
    assert body["messages"][0] == {"role": "system", "content": "Be brief."}
    assert body["model"] == "m1" and body["stream"] is False
    for field in (
        "temperature",
        "max_tokens",
        "top_p",
        "frequency_penalty",
        "presence_penalty",
        "stop",
    ):
        assert body[field] == getattr(CFG, field)


async def test_openai_sse_stream_with_usage(server: LLMServer) -> None:
    server.script(Reply(words=["a", "b", "c"]))
    chunks = await collect(openai(server))
    assert "".join(c.delta for c in chunks) == "a b c"
    assert [c.delta for c in chunks if c.delta] == ["a", " b", " c"]
    usage = [c.usage for c in chunks if c.usage]
    assert len(usage) == 1 and usage[0].total_tokens == 10
    assert server.requests[-1].body["stream_options"] == {"include_usage": True}


async def test_openai_stream_without_usage(server: LLMServer) -> None:
    server.script(Reply(usage=False))
    chunks = await collect(openai(server))
    assert chunks and all(c.usage is None for c in chunks)


async def test_malformed_sse_is_a_protocol_error(server: LLMServer) -> None:
    server.script(Reply(kind="malformed"))
    with pytest.raises(ProviderProtocolError, match="malformed SSE"):
        await collect(openai(server))


async def test_stream_without_done_is_a_protocol_error(server: LLMServer) -> None:
    server.script(Reply(kind="no_done"))
    with pytest.raises(ProviderProtocolError, match=r"\[DONE\]"):
        await collect(openai(server))


async def test_dropped_connection_mid_stream(server: LLMServer) -> None:
    server.script(Reply(kind="drop", after=2, words=["a", "b", "c", "d"]))
    got: list[str] = []
    p = openai(server)
    with pytest.raises((ProviderConnectionError, ProviderProtocolError)) as info:
        async for chunk in p.stream(CTX, CFG):
            got.append(chunk.delta)
    await p.aclose()
    assert info.value.retriable
    assert got == ["a", " b"]


async def test_429_carries_retry_after(server: LLMServer) -> None:
    server.script(Reply(kind="status", status=429, retry_after="2"))
    with pytest.raises(ProviderRateLimited) as info:
        await collect(openai(server))
    assert info.value.retry_after_s == 2.0 and info.value.status_code == 429


async def test_5xx_and_4xx_mapped(server: LLMServer) -> None:
    server.script(Reply(kind="status", status=503), Reply(kind="status", status=400))
    p = openai(server)
    with pytest.raises(ProviderServerError) as five:
        await p.generate(CTX, CFG)
    with pytest.raises(ProviderRequestError) as four:
        await p.generate(CTX, CFG)
    await p.aclose()
    assert five.value.retriable and not four.value.retriable
    assert "scripted failure" in str(four.value)


async def test_hang_times_out(server: LLMServer) -> None:
    server.script(Reply(kind="hang", after=1))
    start = time.monotonic()
    with pytest.raises(ProviderTimeout):
        await collect(openai(server), timeout_s=0.4)
    assert time.monotonic() - start < 3


async def test_cancelling_the_consumer_aborts_the_http_stream(server: LLMServer) -> None:
    server.script(Reply(kind="hang", after=1))
    p = openai(server)
    first = asyncio.Event()

    async def consume() -> None:
        async for _ in p.stream(CTX, CFG):
            first.set()

    task = asyncio.create_task(consume())
    await asyncio.wait_for(first.wait(), 5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await await_until(lambda: server.aborted >= 1, 1.0, 0.02, "the server to see the abort")
    await p.aclose()
    assert server.aborted == 1


async def test_azure_deployment_url_api_version_and_api_key_header(server: LLMServer) -> None:
    cfg = ProviderConfig(
        name="az",
        kind="azure",
        base_url=server.url,
        deployment="dep1",
        api_version="2024-06-01",
        requires_key=True,
    )
    p = OpenAICompatibleProvider(cfg, secrets=secret)
    chunks = await collect(p)
    assert "".join(c.delta for c in chunks) == "hello from the loopback"
    seen = server.requests[-1]
    assert seen.path == "/openai/deployments/dep1/chat/completions"
    assert seen.query == {"api-version": "2024-06-01"}
    assert seen.headers["api-key"] == "az-key-9"
    assert "Authorization" not in seen.headers and "model" not in seen.body


async def test_missing_key_fails_without_calling(server: LLMServer) -> None:
    cfg = ProviderConfig(
        name="nokey", kind="openai", base_url=server.url + "/v1", requires_key=True
    )
    p = OpenAICompatibleProvider(cfg, secrets=secret)
    with pytest.raises(ProviderRequestError, match=r"llm\.nokey\.api_key"):
        await p.generate(CTX, CFG)
    assert not server.requests
    assert not await p.check_setup()
    await p.aclose()


async def test_endpoint_override_only_to_allowed_origins(server: LLMServer) -> None:
    p = openai(server)
    evil = CFG.model_copy(update={"api_endpoint": "http://attacker.invalid/v1"})
    with pytest.raises(ProviderRequestError, match="not an allowed endpoint"):
        await p.generate(CTX, evil)
    same = CFG.model_copy(update={"api_endpoint": server.url + "/v1"})
    assert (await p.generate(CTX, same)).content
    await p.aclose()
    assert len(server.requests) == 1


async def test_ollama_json_and_ndjson(server: LLMServer) -> None:
    p = ollama(server)
    result = await p.generate(CTX, CFG)
    assert result.content == "hello from the loopback"
    assert result.usage is not None and result.usage.prompt_tokens == 9
    body = server.requests[-1].body
    assert body["options"] == {
        "temperature": 0.3,
        "top_p": 0.9,
        "num_predict": 50,
        "frequency_penalty": 0.1,
        "presence_penalty": 0.2,
        "stop": ["\n\n"],
    }
    chunks = await collect(p)
    assert "".join(c.delta for c in chunks) == "hello from the loopback"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 4


async def test_ollama_failures(server: LLMServer) -> None:
    server.script(
        Reply(kind="malformed"),
        Reply(kind="drop"),
        Reply(usage=False),
        Reply(kind="status", status=429, retry_after="1"),
    )
    with pytest.raises(ProviderProtocolError, match="NDJSON"):
        await collect(ollama(server))
    with pytest.raises((ProviderConnectionError, ProviderProtocolError)):
        await collect(ollama(server))
    chunks = await collect(ollama(server))
    assert all(c.usage is None for c in chunks)
    with pytest.raises(ProviderRateLimited) as info:
        await collect(ollama(server))
    assert info.value.retry_after_s == 1.0


async def test_check_setup_against_server(server: LLMServer) -> None:
    p = openai(server)
    assert await p.check_setup()
    await p.aclose()
    down = OllamaProvider(ProviderConfig(name="x", kind="ollama", base_url="http://127.0.0.1:9"))
    assert not await down.check_setup()


async def test_local_provider_is_deterministic() -> None:
    p = LocalProvider()
    a = await p.generate(CTX, CFG)
    b = await p.generate(CTX, CFG)
    streamed = await collect(p)
    assert a.content == b.content == "".join(c.delta for c in streamed)
    assert len([c for c in streamed if c.delta]) == len(a.content.split())
    assert a.usage is not None and a.usage.prompt_tokens > 0 and not a.usage.estimated
    other = await p.generate(CTX, CFG.model_copy(update={"model": "m2"}))
    assert other.content != a.content
    short = await p.generate(CTX, CFG.model_copy(update={"max_tokens": 3}))
    assert len(short.content.split()) == 3


def test_providers_file(tmp_path: Path) -> None:
    f = tmp_path / "p.yaml"
    f.write_text(
        "providers:\n  vllm: {kind: vllm, base_url: 'http://h:8000/v1'}\n"
        "  ol: {kind: ollama, base_url: 'http://h:11434'}\n"
    )
    reg = LLMRegistry.from_settings(Settings(llm_providers_file=f))
    assert reg.names() == ["local", "ol", "vllm"]
    assert isinstance(reg.get_provider("ol"), OllamaProvider)
    assert isinstance(reg.get_provider("vllm"), OpenAICompatibleProvider)
    with pytest.raises(ProviderRequestError, match="unknown provider"):
        reg.get_provider("nope")
    f.write_text("providers:\n  x: {kind: openai, api_key: sk-oops}\n")
    with pytest.raises(SettingsError, match="keychain"):
        load_providers_file(f)


async def test_key_from_a_real_file_keyring(
    server: LLMServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from agentstream.streams.credentials import KeychainCredentialsProvider

    monkeypatch.setenv("AGENTSTREAM_KEYRING_BACKEND", "plaintext-file")
    monkeypatch.setenv("AGENTSTREAM_KEYRING_FILE", str(tmp_path / "keyring.cfg"))
    from agentstream.streams import settings as settings_mod

    settings_mod.get_settings.cache_clear()
    try:
        await KeychainCredentialsProvider().set_secret("llm.oa.api_key", "sk-from-keyring")
        assert await keychain_secret("llm.oa.api_key") == "sk-from-keyring"
        assert await keychain_secret("llm.none.api_key") is None
        reg = LLMRegistry()
        reg.register_provider(
            "oa", {"kind": "openai", "base_url": server.url + "/v1", "requires_key": True}
        )
        p = await reg.initialize_provider("oa")
        await p.generate(CTX, CFG.model_copy(update={"organization": None}))
        await reg.aclose()
        assert server.requests[-1].headers["Authorization"] == "Bearer sk-from-keyring"
    finally:
        settings_mod.get_settings.cache_clear()


async def test_a_key_echoed_in_an_error_body_is_scrubbed(server: LLMServer) -> None:
    server.script(
        Reply(kind="status", status=401, body='{"error": "bad key sk-test-123 given"}'),
        Reply(kind="status", status=401, body='{"error": "bad key sk-test-123 given"}'),
    )
    p = openai(server)
    with pytest.raises(ProviderRequestError) as json_err:
        await p.generate(CTX, CFG)
    with pytest.raises(ProviderRequestError) as stream_err:
        await collect(p)
    for err in (json_err.value, stream_err.value):
        assert "sk-test-123" not in str(err) and "***" in str(err)


async def test_a_request_naming_no_model_gets_the_providers_default(server: LLMServer) -> None:
    no_model = CFG.model_copy(update={"model": None})
    p = openai(server, model="gpt-4o-mini")
    assert (await p.generate(CTX, no_model)).model == "gpt-4o-mini"
    await p.aclose()
    o = OllamaProvider(
        ProviderConfig(name="ol", kind="ollama", base_url=server.url, model="llama3.2")
    )
    await collect_with(o, no_model)
    assert [r.body["model"] for r in server.requests] == ["gpt-4o-mini", "llama3.2"]


async def test_azure_routes_to_the_deployment_a_model_names(server: LLMServer) -> None:
    cfg = ProviderConfig(
        name="az",
        kind="azure",
        base_url=server.url,
        models={"fast": "mini-deployment"},
        requires_key=True,
    )
    p = OpenAICompatibleProvider(cfg, secrets=secret)
    await p.generate(CTX, CFG.model_copy(update={"model": "mini-deployment"}))
    assert server.requests[-1].path == "/openai/deployments/mini-deployment/chat/completions"
    with pytest.raises(ProviderRequestError, match="no deployment"):
        await p.generate(CTX, CFG.model_copy(update={"model": None}))
    await p.aclose()
    assert len(server.requests) == 1


async def collect_with(provider: LLMProvider, config: LLMConfig) -> list[StreamChunk]:
    out = [chunk async for chunk in provider.stream(CTX, config)]
    await provider.aclose()
    return out


@pytest.mark.parametrize(
    "endpoint",
    [
        "{url}/api/pull?",  # the appended /api/chat becomes a query: Ollama's pull API
        "{url}/api/pull#",
        "{url}/other",  # another path of the allowed origin
        "{url}/v1/../api",
        "{url}/v1?x=1",
        "http://user:pw@{host}/v1",
        # what urlsplit strips or drops, but httpx does not: a URL without a host, whose
        # error counted against the breaker every agent uses (review)
        " {url}/v1",
        "\x00{url}/v1",
        "{url}/v1\t",
        "{url}/v\n1",
        "{url}/v1\x7f",
    ],
)
async def test_an_endpoint_override_is_a_whole_allowed_base_url(
    server: LLMServer, endpoint: str
) -> None:
    # The key travels with the call: a request may choose among the base URLs the
    # operator allowed, not any path of their hosts (SSRF with the provider's key).
    p = openai(server)
    url = endpoint.format(url=server.url, host=server.url.split("//", 1)[1])
    evil = CFG.model_copy(update={"api_endpoint": url})
    with pytest.raises(ProviderRequestError, match="not an allowed endpoint"):
        await p.generate(CTX, evil)
    await p.aclose()
    assert not server.requests


async def test_an_allowed_endpoint_is_reached_at_its_own_path(server: LLMServer) -> None:
    p = openai(server, allowed_endpoints=[server.url + "/eu/v1/"])
    eu = CFG.model_copy(update={"api_endpoint": server.url + "/eu/v1"})
    assert (await p.generate(CTX, eu)).content
    await p.aclose()
    assert server.requests[-1].path == "/eu/v1/chat/completions"


async def test_a_requested_azure_deployment_is_one_path_segment(server: LLMServer) -> None:
    cfg = ProviderConfig(name="az", kind="azure", base_url=server.url, requires_key=True)
    p = OpenAICompatibleProvider(cfg, secrets=secret)
    with contextlib.suppress(ProviderError):  # the loopback server knows no such path
        await p.generate(CTX, CFG.model_copy(update={"model": "../../admin?x="}))
    await p.aclose()
    # the server decodes the path: one segment holding the whole name, not ../../admin
    # resolved to /admin with a query
    assert server.requests[-1].path == "/openai/deployments/../../admin?x=/chat/completions"


async def test_a_key_across_the_error_snippets_end_is_scrubbed_first(server: LLMServer) -> None:
    # The body is cut to ERROR_BODY_CHARS for the message: cut before scrubbing, a key
    # spanning the cut left its first characters in the event.
    from agentstream.agents.llm.providers._http import ERROR_BODY_CHARS

    body = "x" * (ERROR_BODY_CHARS - 8) + " sk-test-123 rest"  # "sk-test" before the cut
    server.script(Reply(kind="status", status=401, body=body))
    p = openai(server)
    with pytest.raises(ProviderRequestError) as caught:
        await p.generate(CTX, CFG)
    await p.aclose()
    assert "sk-test" not in str(caught.value), str(caught.value)[-40:]


async def test_secret_header_values_are_scrubbed_too(server: LLMServer) -> None:
    # an operator's own `headers` (a gateway's key) are as secret as the API key
    server.script(Reply(kind="status", status=403, body='{"error": "gw-secret-4711 refused"}'))
    p = openai(server, headers={"X-Gateway-Key": "gw-secret-4711"})
    with pytest.raises(ProviderRequestError) as caught:
        await p.generate(CTX, CFG)
    await p.aclose()
    assert "gw-secret-4711" not in str(caught.value)


async def test_a_request_may_bill_only_an_allowed_organization(server: LLMServer) -> None:
    # the key may belong to several organizations: the header decides which one pays
    p = openai(server, organization="org-main", allowed_organizations=["org-7"])
    with pytest.raises(ProviderRequestError, match="organization 'org-other' is not allowed"):
        await p.generate(CTX, CFG.model_copy(update={"organization": "org-other"}))
    await p.generate(CTX, CFG.model_copy(update={"organization": None}))
    assert server.requests[-1].headers["OpenAI-Organization"] == "org-main"
    await p.generate(CTX, CFG)
    assert server.requests[-1].headers["OpenAI-Organization"] == "org-7"
    await p.aclose()
    assert len(server.requests) == 2


#: token counts a provider may send that are no count: infinity once parsed, one past
#: what an event can encode (2**64), negative, not a number
NO_COUNTS = ["1e400", "18446744073709551616", "-5", '"many"']


@pytest.mark.parametrize("count", NO_COUNTS)
async def test_a_token_count_that_is_no_count_leaves_usage_to_the_estimate(
    server: LLMServer, count: str
) -> None:
    """The answer stands and its usage is estimated (as with none sent), not an
    OverflowError out of the call, nor a count the final response cannot encode."""
    answer = (
        '{"id": "c", "object": "chat.completion", "model": "m1", "choices": [{"index": 0, '
        '"finish_reason": "stop", "message": {"role": "assistant", "content": "hi"}}], '
        f'"usage": {{"prompt_tokens": {count}, "completion_tokens": 2, "total_tokens": 3}}}}'
    )
    server.script(Reply(kind="status", status=200, body=answer))
    result = await openai(server).generate(CTX, CFG)
    assert result.content == "hi" and result.usage is None
    server.script(
        Reply(
            kind="status",
            status=200,
            body='{"model": "m1", "message": {"role": "assistant", "content": "hi"}, '
            f'"done": true, "prompt_eval_count": {count}, "eval_count": 2}}',
        )
    )
    result = await ollama(server).generate(CTX, CFG)
    assert result.content == "hi" and result.usage is None


def test_token_counts_within_range_are_kept() -> None:
    from agentstream.agents.llm.providers.base import MAX_REPORTED_TOKENS, reported_usage

    usage = reported_usage(7, "5", None)
    assert usage is not None and (usage.prompt_tokens, usage.total_tokens) == (7, 12)
    assert reported_usage(MAX_REPORTED_TOKENS, 0) is not None
    assert reported_usage(MAX_REPORTED_TOKENS + 1, 0) is None
    assert reported_usage(True, 1) is None and reported_usage(float("nan"), 1) is None
    from agentstream.agents.llm.providers.anthropic import anthropic_usage

    assert anthropic_usage({"input_tokens": float("inf"), "output_tokens": 1}) is None
    assert anthropic_usage({"input_tokens": 3, "output_tokens": 2**64}) is None
    kept = anthropic_usage({"input_tokens": 3, "cache_read_input_tokens": 2, "output_tokens": 1})
    assert kept is not None and (kept.prompt_tokens, kept.total_tokens) == (5, 6)
