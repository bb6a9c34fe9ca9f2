"""`agentstream llm ...`: ask a question through the pipeline, list and check providers,
show breaker states and token usage from a running worker."""

from __future__ import annotations

import json
import re
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import click
import yaml
from pydantic import ValidationError

from agentstream.schemas import Event, registry
from agentstream.schemas.errors import SchemaError
from agentstream.schemas.llm import (
    ChatMessage,
    LLMConfig,
    LLMContext,
    LLMRequest,
    LLMResponse,
    LLMStreamChunk,
    NamedFunction,
    NamedToolChoice,
    ResponseFormat,
    Tool,
    ToolChoice,
)
from agentstream.streams.cli import (
    cli,
    finite_seconds,
    json_option,
    reading_answer,
    run,
    term_safe,
    without_agents,
    worker_call,
    worker_json,
)
from agentstream.streams.client import AsyncClient, group_less_consumer
from agentstream.streams.documents import MAX_NESTING, too_deep
from agentstream.streams.settings import get_settings
from agentstream.streams.topics import LLM_CHUNKS, LLM_REQUESTS, LLM_RESPONSES


@cli.group("llm")
def llm_group() -> None:
    """LLM calls through the pipeline (call_llm)."""


@without_agents
@llm_group.command("ask")
@click.argument("prompt")
@click.option("--provider", default=None, help="Registered provider (default: the configured).")
@click.option("--fallback", multiple=True, help="Fallback providers, in order (repeatable).")
@click.option(
    "--model",
    default=None,
    help="An alias of the providers file, or provider/model (default: the worker's default model).",
)
@click.option("--max-tokens", type=int, default=None)
@click.option("--temperature", type=float, default=None)
@click.option("--system", "system_prompt", default=None, help="System prompt.")
@click.option("--search", "web_search_query", default=None, help="Web search query to add.")
@click.option("--agent", "agent_id", default="cli", show_default=True)
@click.option("--no-stream", is_flag=True, help="Ask for the whole answer at once.")
@click.option(
    "--tools",
    "tools_file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="JSON or YAML file: a list of tools the model may call (OpenAI's function tools, "
    "or just their functions: name, description, parameters).",
)
@click.option(
    "--tool-choice",
    default=None,
    help="auto, none, required, or the name of the one tool to call (needs --tools).",
)
@click.option(
    "--schema",
    "schema_file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="JSON or YAML file: a JSON Schema the answer must match (response_format).",
)
@click.option(
    "--timeout",
    "wait_s",
    # checked before the request is sent: nan, 0 or -1 sent it, then gave up at once
    type=click.FloatRange(min=0, min_open=True),
    callback=finite_seconds,
    default=120,
    show_default=True,
    help="Seconds to wait for the final response.",
)
@json_option()
def ask(
    prompt: str,
    provider: str | None,
    fallback: tuple[str, ...],
    model: str | None,
    max_tokens: int | None,
    temperature: float | None,
    system_prompt: str | None,
    web_search_query: str | None,
    agent_id: str,
    no_stream: bool,
    tools_file: Path | None,
    tool_choice: str | None,
    schema_file: Path | None,
    wait_s: float,
    as_json: bool,
) -> None:
    """Publish an LLMRequest, print its chunks as they stream, then the final response.

    Tool calls the model makes are printed one per line, `tool <id> <name> <arguments>`;
    with --schema the status line says whether the answer matched it."""
    tools = _tools(tools_file) if tools_file is not None else None
    choice = _tool_choice(tool_choice, tools)
    response_format = _response_format(schema_file) if schema_file is not None else None
    try:
        request = LLMRequest(
            request_id=uuid.uuid4().hex,
            agent_id=agent_id,
            provider=provider,
            fallback=list(fallback),
            stream=not no_stream,
            context=LLMContext(
                messages=[ChatMessage(role="user", content=prompt)],
                system_prompt=system_prompt,
                web_search_query=web_search_query,
            ),
            config=LLMConfig(
                model=model,
                max_tokens=max_tokens,
                temperature=temperature,
                tools=tools,
                tool_choice=choice,
                response_format=response_format,
            ),
        )
    except ValidationError as exc:  # an option out of bounds, before anything connects
        err = exc.errors(include_url=False)[0]
        option = "--" + str(err["loc"][-1]).replace("_", "-") if err["loc"] else "an option"
        raise click.BadParameter(err["msg"], param_hint=f"'{option}'") from None
    response = run(_ask(request, wait_s, quiet=as_json))
    if as_json:
        click.echo(json.dumps(response.model_dump(mode="json"), indent=2))
        return
    usage = response.usage
    tokens = (
        (
            f"{usage.prompt_tokens}+{usage.completion_tokens} tokens"
            f"{' (estimated)' if usage.estimated else ''}"
        )
        if usage
        else "no usage"
    )
    alias = f" ({response.alias})" if response.alias else ""
    for call in response.tool_calls:
        click.echo(
            "\n" + term_safe(f"tool {call.id} {call.function.name} {call.function.arguments}"),
            nl=False,
        )
    checked = ""
    if response.schema_valid is not None:
        checked = ", schema valid" if response.schema_valid else ", schema INVALID: "
        checked += response.schema_error if not response.schema_valid else ""
    finish = f", {response.finish_reason}" if response.finish_reason else ""
    click.echo(
        "\n"
        + term_safe(
            f"[{response.status}] {response.provider}/{response.model}{alias} "
            f"{response.latency_ms:.0f} ms, {len(response.attempts)} attempt(s), {tokens}"
            f"{finish}{checked}"
        ),
        err=True,
    )
    if response.error is not None:
        raise click.ClickException(
            term_safe(f"{response.error.error_class}: {response.error.message}")
        )


def _document(path: Path, option: str) -> Any:
    """A JSON or YAML file's content; a mistake is one line naming the option."""
    try:
        text = path.read_text(encoding="utf-8")
        # checked first: building a deeper one exhausted the stack (a RecursionError)
        line = too_deep(text, json_text=path.suffix == ".json")
        if line is not None:
            raise click.BadParameter(
                f"{path}, line {line}: nested too deeply (more than {MAX_NESTING} levels)",
                param_hint=option,
            )
        return json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except OSError as exc:
        raise click.BadParameter(f"{path}: {exc.strerror}", param_hint=option) from None
    except UnicodeDecodeError as exc:
        raise click.BadParameter(
            f"{path}: not JSON or YAML: not UTF-8 (byte {exc.start})", param_hint=option
        ) from None
    except RecursionError:  # a last resort: `too_deep` stops these first
        raise click.BadParameter(f"{path}: nested too deeply", param_hint=option) from None
    except (ValueError, yaml.YAMLError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise click.BadParameter(f"{path}: not JSON or YAML: {first}", param_hint=option) from None


def _first_error(exc: ValidationError) -> str:
    err = exc.errors(include_url=False)[0]
    where = ".".join(str(p) for p in err["loc"])
    return f"{where}: {err['msg']}" if where else str(err["msg"])


def _tools(path: Path) -> list[Tool]:
    data = _document(path, "'--tools'")
    if isinstance(data, dict) and isinstance(data.get("tools"), list):
        data = data["tools"]  # a file holding {"tools": [...]}, as a request body does
    if not isinstance(data, list) or not data:
        raise click.BadParameter(f"{path}: expected a list of tools", param_hint="'--tools'")
    tools = []
    for i, item in enumerate(data):
        spec = item if isinstance(item, dict) and "function" in item else {"function": item}
        try:
            tools.append(Tool.model_validate(spec))
        except ValidationError as exc:
            raise click.BadParameter(
                f"{path}: tool {i + 1}: {_first_error(exc)}", param_hint="'--tools'"
            ) from None
    return tools


def _tool_choice(choice: str | None, tools: list[Tool] | None) -> ToolChoice | None:
    if choice is None:
        return None
    if not tools:
        raise click.BadParameter("needs --tools", param_hint="'--tool-choice'")
    if choice in ("auto", "none", "required"):
        return choice  # type: ignore[return-value]
    names = [t.function.name for t in tools]
    if choice not in names:
        raise click.BadParameter(
            f"{choice!r} is not auto, none, required or a tool of --tools ({', '.join(names)})",
            param_hint="'--tool-choice'",
        )
    return NamedToolChoice(function=NamedFunction(name=choice))


def _response_format(path: Path) -> ResponseFormat:
    schema = _document(path, "'--schema'")
    if not isinstance(schema, dict):
        raise click.BadParameter(f"{path}: expected a JSON Schema object", param_hint="'--schema'")
    name = re.sub(r"[^A-Za-z0-9_-]", "_", path.stem)[:64] or "answer"
    try:
        return ResponseFormat(type="json_schema", json_schema={"name": name, "schema": schema})
    except ValidationError as exc:
        raise click.BadParameter(f"{path}: {_first_error(exc)}", param_hint="'--schema'") from None


async def _ask(request: LLMRequest, wait_s: float, *, quiet: bool) -> LLMResponse:
    from aiokafka import TopicPartition

    settings = get_settings()
    topics = [settings.topic(LLM_CHUNKS), settings.topic(LLM_RESPONSES)]
    consumer = group_less_consumer(settings, "llm-cli")
    await consumer.start()
    try:
        await consumer._client.force_metadata_update()
        tps = [
            TopicPartition(t, p)
            for t in topics
            for p in sorted(consumer.partitions_for_topic(t) or ())
        ]
        consumer.assign(tps)
        await consumer.seek_to_end(*tps)
        for tp in tps:  # resolve positions now, before the request exists
            await consumer.position(tp)
        async with AsyncClient(settings, source="agentstream-cli") as client:
            await client.publish(LLM_REQUESTS, Event.of(request, source="agentstream-cli"))
        deadline = time.monotonic() + wait_s
        final: LLMResponse | None = None
        chunks_seen = 0
        while time.monotonic() < deadline:
            batch = await consumer.getmany(timeout_ms=200)
            for records in batch.values():
                for rec in records:
                    try:
                        payload = registry.decode(rec.value).payload
                    except SchemaError:  # someone else's bad record is not our answer
                        continue
                    if getattr(payload, "request_id", None) != request.request_id:
                        continue
                    if isinstance(payload, LLMStreamChunk):
                        chunks_seen += 1
                        if not quiet:
                            sys.stdout.write(payload.delta)
                            sys.stdout.flush()
                    elif isinstance(payload, LLMResponse):
                        final = payload
            # chunks and the response are on two topics, fetched independently: the
            # response can come first, so wait (briefly) for the chunks it counts
            if final is not None and (chunks_seen >= final.chunks or not request.stream):
                if not request.stream and not quiet:
                    sys.stdout.write(final.content)
                return final
            if final is not None:
                deadline = min(deadline, time.monotonic() + 2.0)
        if final is not None:
            return final
        raise click.ClickException(f"no response within {wait_s:g}s (is a worker running?)")
    finally:
        await consumer.stop()


@without_agents
@llm_group.command("providers")
@click.option("--check", is_flag=True, help="Also run each provider's setup check.")
def providers(check: bool) -> None:
    """The providers this configuration declares (`local` is always there)."""
    from agentstream.agents.llm.registry import LLMRegistry

    reg = LLMRegistry.from_settings(get_settings())

    async def checks() -> dict[str, bool]:
        out = {n: await reg.check_provider_setup(n) for n in reg.names()}
        await reg.aclose()
        return out

    status = run(checks()) if check else {}
    catalog = reg.catalog
    for name in reg.names():
        cfg = reg.config(name)
        mark = "" if not check else ("  ok" if status[name] else "  NOT READY")
        click.echo(
            f"{name:16} {cfg.kind:9} {cfg.base_url or '-':40} "
            f"key={'keychain' if cfg.requires_key else 'none'}{mark}"
        )
        served = {a: catalog.serves(name, a) for a in sorted(catalog.aliases)}
        models = [f"{a}={m}" for a, m in served.items() if m]
        if cfg.default_model:
            models.append(f"default={cfg.default_model}")
        if models:
            click.echo(f"{'':16} models: {', '.join(models)}")
    if catalog.aliases:
        click.echo(
            f"aliases: {', '.join(sorted(catalog.aliases))}; "
            f"default: {catalog.default_alias or 'none (each provider has its own)'}"
        )


@llm_group.command("breakers")
def breakers() -> None:
    """Circuit breaker state per provider (from a running worker)."""
    resp = worker_call("/llm/breakers")
    data = worker_json(resp, "breakers")
    lines = []
    with reading_answer(resp):  # every line made before any is printed
        for name, b in data["breakers"].items():
            live = b["live"]
            rec = b.get("recorded") or {}
            lines.append(
                term_safe(
                    f"{name:16} {live['state']:9} failures={live['failures']} "
                    f"last change: {rec.get('previous', '-')}→{rec.get('state', '-')} "
                    f"{rec.get('changed_at', '')} {rec.get('reason', '')}"
                )
            )
    for line in lines:
        click.echo(line)


@llm_group.command("usage")
@json_option()
def usage(as_json: bool) -> None:
    """Token totals per agent, provider and model (from a running worker)."""
    resp = worker_call("/llm/usage")
    data = worker_json(resp, "agent", "provider", "model")
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    lines = []
    with reading_answer(resp):  # every line made before any is printed
        for kind in ("agent", "provider", "model"):
            for name, t in sorted(data[kind].items()):
                # agent ids, provider and model names are the senders' (a hostile
                # one writes escape sequences): printed as text only
                lines.append(
                    term_safe(
                        f"{kind:8} {name:32} requests={t.get('requests', 0):6} "
                        f"prompt={t.get('prompt_tokens', 0):8} "
                        f"completion={t.get('completion_tokens', 0):8} "
                        f"estimated={t.get('estimated_requests', 0)}"
                    )
                )
        lines.extend(budget_lines(data.get("budgets") or []))
    for line in lines:
        click.echo(line)


def budget_lines(rows: list[dict[str, Any]]) -> list[str]:
    """One line per budget row of `/llm/usage`: who, what it covers, the window, spent
    against each limit the budget has, and EXCEEDED once a request would be refused."""
    lines = []
    for r in rows:
        scope = f"{r.get('agent')} {r.get('provider', '*')}/{r.get('model', '*')} {r.get('window')}"
        spent = []
        if r.get("max_tokens") is not None:
            spent.append(f"tokens={r.get('spent_tokens', 0)}/{r['max_tokens']}")
        if r.get("max_cost_usd") is not None:
            cost = f"cost=${r.get('spent_cost_usd', 0.0):.4f}/${r['max_cost_usd']:.4f}"
            if r.get("unpriced_requests"):
                cost += f" (+{r['unpriced_requests']} unpriced)"
            spent.append(cost)
        state = "EXCEEDED" if r.get("exceeded") else "ok"
        lines.append(term_safe(f"budget   {scope:40} {' '.join(spent)} {state}"))
    return lines
