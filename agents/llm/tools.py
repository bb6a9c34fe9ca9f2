"""Tool calling, as plain functions: a request's tools and messages in each provider's
shape, and streamed tool-call pieces put back together into complete calls.

Providers stream tool calls differently — OpenAI as `delta.tool_calls` pieces keyed by
`index` (several calls interleaved, arguments in fragments), Anthropic as `tool_use`
content blocks whose `input_json_delta`s carry the arguments, Ollama as complete calls
with the arguments as an object — and each one reports them here as `ToolCallDelta`s.
`ToolCallAccumulator` joins them into the final `ToolCall`s, bounded (a provider cannot
make the worker hold unbounded calls or arguments) and strict about what cannot be a
call (a piece of a call that never got a name, an index out of range): those are
`ProviderProtocolError`s, never a silently dropped call.
"""

from __future__ import annotations

from typing import Any

import orjson

from agentstream.schemas.llm import (
    MAX_TOOL_CALLS,
    TOOL_NAME,
    ChatMessage,
    FunctionCall,
    LLMConfig,
    LLMContext,
    NamedToolChoice,
    ToolCall,
    ToolCallDelta,
)
from agentstream.streams.errors import ProviderProtocolError, ProviderRequestError

#: characters of arguments one answer's tool calls may hold in total
MAX_ARGUMENTS_CHARS = 1_000_000


def parses_as_json(text: str) -> bool:
    try:
        orjson.loads(text)
    except orjson.JSONDecodeError:
        return False
    return True


class ToolCallAccumulator:
    """`ToolCallDelta`s (any order of indexes, each call's fragments in order) → the
    complete calls, in index order."""

    __slots__ = ("_calls", "_chars", "_provider")

    def __init__(self, provider: str = "") -> None:
        self._provider = provider
        #: index → [id, name, argument fragments]
        self._calls: dict[int, tuple[list[str], list[str], list[str]]] = {}
        self._chars = 0

    def __bool__(self) -> bool:
        return bool(self._calls)

    def _error(self, message: str) -> ProviderProtocolError:
        return ProviderProtocolError(f"{self._provider}: {message}", provider=self._provider)

    def add(self, delta: ToolCallDelta) -> None:
        call = self._calls.get(delta.index)
        if call is None:
            if len(self._calls) >= MAX_TOOL_CALLS:  # unreachable while index < MAX
                raise self._error(f"more than {MAX_TOOL_CALLS} tool calls")
            call = self._calls[delta.index] = ([], [], [])
        ids, names, args = call
        if delta.id:
            if ids and ids[0] != delta.id:
                raise self._error(f"tool call {delta.index} changed its id")
            ids[:] = [delta.id]
        if delta.name:
            # some servers resend the name with every piece; a different one is a new call
            # in the same slot, which no protocol allows
            if names and names[0] != delta.name:
                raise self._error(f"tool call {delta.index} changed its name")
            names[:] = [delta.name]
        if delta.arguments:
            self._chars += len(delta.arguments)
            if self._chars > MAX_ARGUMENTS_CHARS:
                raise self._error(f"tool call arguments exceed {MAX_ARGUMENTS_CHARS} characters")
            args.append(delta.arguments)

    def finish(self, *, skip_unnamed: bool = False) -> list[ToolCall]:
        """The complete calls, in index order. A call that got arguments but never a name
        fails the stream (a `ProviderProtocolError`), or is left out with `skip_unnamed`
        (a stream cut short, where the rest will never come)."""
        out = []
        for index in sorted(self._calls):
            ids, names, args = self._calls[index]
            if not names:
                if skip_unnamed:
                    continue
                raise self._error(f"tool call {index} has arguments but no name")
            arguments = "".join(args)
            out.append(
                ToolCall(
                    # Ollama names no ids; one is needed to send the result back
                    id=ids[0] if ids else f"call_{index}",
                    function=FunctionCall(name=names[0], arguments=arguments),
                    arguments_valid=parses_as_json(arguments),
                )
            )
        return out


def delta(
    provider: str, index: Any, id_: Any = "", name: Any = "", arguments: Any = ""
) -> ToolCallDelta:
    """A `ToolCallDelta` from a provider's fields, or a `ProviderProtocolError` saying
    which field could not be one."""
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < MAX_TOOL_CALLS:
        raise ProviderProtocolError(
            f"{provider}: tool call index {str(index)[:40]!r} is not 0..{MAX_TOOL_CALLS - 1}",
            provider=provider,
        )
    id_ = id_ or ""
    name = name or ""
    if not isinstance(id_, str) or len(id_) > 256:
        raise ProviderProtocolError(f"{provider}: tool call {index}: bad id", provider=provider)
    if not isinstance(name, str) or (name and not TOOL_NAME.fullmatch(name)):
        raise ProviderProtocolError(
            f"{provider}: tool call {index}: name {str(name)[:80]!r} is not a tool name",
            provider=provider,
        )
    if not isinstance(arguments, str):
        arguments = "" if arguments is None else orjson.dumps(arguments).decode()
    return ToolCallDelta.model_construct(index=index, id=id_, name=name, arguments=arguments)


# -- OpenAI-compatible (OpenAI, Azure, vLLM, llama.cpp, LM Studio) ------------------------
def openai_messages(context: LLMContext) -> list[dict[str, Any]]:
    """The context as chat-completions messages, system prompt first."""
    out: list[dict[str, Any]] = []
    if context.system_prompt:
        out.append({"role": "system", "content": context.system_prompt})
    for m in context.messages:
        msg: dict[str, Any] = {"role": m.role, "content": m.content}
        if m.tool_calls:
            msg["tool_calls"] = [
                {
                    "id": c.id,
                    "type": "function",
                    "function": {"name": c.function.name, "arguments": c.function.arguments},
                }
                for c in m.tool_calls
            ]
            if not m.content:
                msg["content"] = None  # the API's "no text, only calls"
        if m.tool_call_id is not None:
            msg["tool_call_id"] = m.tool_call_id
        out.append(msg)
    return out


def openai_tools(config: LLMConfig) -> dict[str, Any]:
    """`tools` and `tool_choice` for a chat-completions body (empty without tools)."""
    out: dict[str, Any] = {}
    if config.tools:
        out["tools"] = [t.model_dump(exclude_none=True) for t in config.tools]
    if config.tool_choice is not None:
        choice = config.tool_choice
        out["tool_choice"] = choice.model_dump() if isinstance(choice, NamedToolChoice) else choice
    return out


def openai_deltas(provider: str, raw: Any) -> list[ToolCallDelta]:
    """`choices[0].delta.tool_calls` of one SSE event → deltas."""
    if not isinstance(raw, list):
        raise ProviderProtocolError(f"{provider}: tool_calls is not a list", provider=provider)
    out = []
    for item in raw:
        if not isinstance(item, dict):
            raise ProviderProtocolError(
                f"{provider}: a tool call is not an object", provider=provider
            )
        fn = item.get("function") or {}
        if not isinstance(fn, dict):
            raise ProviderProtocolError(
                f"{provider}: tool call function is not an object", provider=provider
            )
        out.append(
            delta(provider, item.get("index"), item.get("id"), fn.get("name"), fn.get("arguments"))
        )
    return out


def openai_message_calls(provider: str, raw: Any) -> list[ToolCall]:
    """`choices[0].message.tool_calls` of a whole (non-streamed) answer → calls."""
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise ProviderProtocolError(f"{provider}: tool_calls is not a list", provider=provider)
    acc = ToolCallAccumulator(provider)
    for i, item in enumerate(raw[: MAX_TOOL_CALLS + 1]):
        fn = item.get("function") if isinstance(item, dict) else None
        if not isinstance(fn, dict):
            raise ProviderProtocolError(
                f"{provider}: tool call {i} has no function", provider=provider
            )
        acc.add(delta(provider, i, item.get("id"), fn.get("name"), fn.get("arguments")))
    return acc.finish()


# -- Ollama -------------------------------------------------------------------------------
def ollama_messages(provider: str, context: LLMContext) -> list[dict[str, Any]]:
    """The context as Ollama chat messages: a call's arguments are an object, a tool's
    result names its tool (`tool_name`, looked up from the call it answers)."""
    out: list[dict[str, Any]] = []
    if context.system_prompt:
        out.append({"role": "system", "content": context.system_prompt})
    names: dict[str, str] = {}
    for m in context.messages:
        msg: dict[str, Any] = {"role": m.role, "content": m.content}
        if m.tool_calls:
            calls = []
            for c in m.tool_calls:
                names[c.id] = c.function.name
                calls.append(
                    {
                        "function": {
                            "name": c.function.name,
                            "arguments": arguments_object(provider, c),
                        }
                    }
                )
            msg["tool_calls"] = calls
        if m.role == "tool" and m.tool_call_id in names:
            msg["tool_name"] = names[m.tool_call_id]
        out.append(msg)
    return out


def ollama_deltas(provider: str, raw: Any, first_index: int) -> list[ToolCallDelta]:
    """`message.tool_calls` of one NDJSON line (complete calls, numbered on from
    `first_index`: Ollama sends each call whole, in its own line or together)."""
    if not isinstance(raw, list):
        raise ProviderProtocolError(f"{provider}: tool_calls is not a list", provider=provider)
    out = []
    for i, item in enumerate(raw):
        fn = item.get("function") if isinstance(item, dict) else None
        if not isinstance(fn, dict):
            raise ProviderProtocolError(
                f"{provider}: a tool call has no function", provider=provider
            )
        args = fn.get("arguments")
        out.append(
            delta(
                provider,
                first_index + i,
                item.get("id"),
                fn.get("name"),
                args if args is not None else {},
            )
        )
    return out


def arguments_object(provider: str, call: ToolCall) -> dict[str, Any]:
    """A call's arguments as the object Anthropic and Ollama want sent back."""
    text = call.function.arguments.strip()
    if not text:
        return {}
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError:
        value = None
    if not isinstance(value, dict):
        raise ProviderRequestError(
            f"{provider}: tool call {call.id[:80]!r}: arguments are not a JSON object, "
            "which this provider needs",
            provider=provider,
        )
    return value


def tool_results_follow_calls(provider: str, messages: list[ChatMessage]) -> None:
    """Every tool message answers a call of an earlier assistant message (Anthropic
    refuses the request otherwise; saying so here names the message)."""
    seen: set[str] = set()
    for i, m in enumerate(messages):
        for c in m.tool_calls or ():
            seen.add(c.id)
        if m.role == "tool" and m.tool_call_id not in seen:
            raise ProviderRequestError(
                f"{provider}: message {i} (tool) answers no earlier tool call "
                f"(tool_call_id {str(m.tool_call_id)[:80]!r})",
                provider=provider,
            )
