"""LLM requests, streamed chunks, final responses, cancellations and breaker transitions."""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from agentstream.schemas.base import MAX_ID_LENGTH, Payload, Time
from agentstream.schemas.limits import MESSAGE_METADATA, check_tree, limits_apply
from agentstream.schemas.registry import registry

#: a tool (function) name, as OpenAI and Anthropic accept it
TOOL_NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")
#: tools a request may declare, and tool calls one answer may carry (OpenAI's limit: 128)
MAX_TOOLS = 128
MAX_TOOL_CALLS = 128
#: a tool's parameters schema: bounded like a response schema
MAX_TOOL_SCHEMA_DEPTH = 32
MAX_TOOL_SCHEMA_ITEMS = 10_000


def _tool_name(name: str) -> str:
    if not TOOL_NAME.fullmatch(name):
        raise ValueError(f"tool name {name[:80]!r}: 1-64 letters, digits, _ or -")
    return name


class FunctionCall(Payload):
    """What a model asked to call: a tool's name and its arguments, a JSON text as the
    model wrote it (it may not parse)."""

    name: str
    arguments: str = ""

    _name = field_validator("name")(_tool_name)


class ToolCall(Payload):
    """One complete tool call, in OpenAI's shape: a final response carries them, and an
    assistant message sent back with the tools' results carries them again."""

    id: str = Field(min_length=1, max_length=256)
    type: Literal["function"] = "function"
    function: FunctionCall
    #: do `function.arguments` parse as JSON (set on a response; ignored when sent back)
    arguments_valid: bool | None = None


class ToolCallDelta(Payload):
    """A streamed piece of tool call number `index`: its first piece names `id` and
    `name`, every piece may add a fragment of `arguments` (concatenated in order)."""

    index: int = Field(ge=0, lt=MAX_TOOL_CALLS)
    id: str = Field(default="", max_length=256)
    name: str = Field(default="", max_length=64)
    arguments: str = ""


class ChatMessage(Payload):
    """v3 of the request added `tool_calls` (assistant) and `tool_call_id` (tool): the
    model's calls and a tool's result sent back."""

    role: Literal["system", "user", "assistant", "tool"]
    content: str = ""
    #: assistant: the tool calls the model made in this turn
    tool_calls: list[ToolCall] | None = Field(default=None, max_length=MAX_TOOL_CALLS)
    #: tool: the id of the call this message answers
    tool_call_id: str | None = Field(default=None, min_length=1, max_length=256)

    @model_validator(mode="after")
    def _tool_fields_on_their_roles(self) -> ChatMessage:
        if self.tool_calls is not None and self.role != "assistant":
            raise ValueError(f"tool_calls on a {self.role} message (only assistant ones)")
        if self.tool_call_id is not None and self.role != "tool":
            raise ValueError(f"tool_call_id on a {self.role} message (only tool ones)")
        return self


class LLMContext(Payload):
    """What the model is asked: the conversation plus optional system prompt."""

    messages: list[ChatMessage] = Field(min_length=1, max_length=1024)
    system_prompt: str | None = None
    #: the Midscene-style adapter adds web search results when set
    web_search_query: str | None = Field(default=None, max_length=1024)
    #: bounded like a message's metadata (`schemas.limits`)
    metadata: dict[str, Any] = Field(
        default_factory=dict, json_schema_extra=MESSAGE_METADATA.json_schema()
    )

    @field_validator("metadata")
    @classmethod
    def _bounded_metadata(cls, value: dict[str, Any], validation: ValidationInfo) -> dict[str, Any]:
        return MESSAGE_METADATA.check(value) if limits_apply(validation) else value


#: the keys OpenAI's `json_schema` object takes
JSON_SCHEMA_KEYS = frozenset({"name", "schema", "strict", "description"})
#: a response schema's size: deep or huge schemas cost every answer's check
MAX_SCHEMA_DEPTH = 32
MAX_SCHEMA_ITEMS = 10_000
_SCHEMA_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")


class ResponseFormat(Payload):
    """Structured output, in OpenAI's shape (as LiteLLM takes it too): `json_schema` — the
    answer must be JSON matching ``json_schema.schema``; `json_object` — any JSON object;
    `text` — no constraint."""

    type: Literal["json_schema", "json_object", "text"]
    #: ``{"name": ..., "schema": {...}, "strict": true, "description": ...}``
    json_schema: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _schema_with_json_schema(self) -> ResponseFormat:
        spec = self.json_schema
        if self.type != "json_schema":
            if spec is not None:
                raise ValueError(f"json_schema is given with type {self.type!r}")
            return self
        if spec is None or not isinstance(spec.get("schema"), dict):
            raise ValueError("type json_schema needs json_schema.schema, a JSON Schema object")
        unknown = sorted(set(spec) - JSON_SCHEMA_KEYS)
        if unknown:
            raise ValueError(f"json_schema: unknown key {unknown[0]!r}")
        name = spec.get("name")
        if name is not None and not (isinstance(name, str) and _SCHEMA_NAME.fullmatch(name)):
            raise ValueError("json_schema.name: 1-64 letters, digits, _ or -")
        if not isinstance(spec.get("strict", False), bool):
            raise ValueError("json_schema.strict: true or false")
        check_tree(spec["schema"], max_depth=MAX_SCHEMA_DEPTH, max_items=MAX_SCHEMA_ITEMS)
        return self


class FunctionSpec(Payload):
    name: str
    description: str | None = Field(default=None, max_length=16 * 1024)
    #: the arguments' JSON Schema (an object schema)
    parameters: dict[str, Any] | None = None
    strict: bool | None = None

    _name = field_validator("name")(_tool_name)

    @field_validator("parameters")
    @classmethod
    def _bounded(cls, parameters: dict[str, Any] | None) -> dict[str, Any] | None:
        if parameters is not None:
            check_tree(parameters, max_depth=MAX_TOOL_SCHEMA_DEPTH, max_items=MAX_TOOL_SCHEMA_ITEMS)
        return parameters


class Tool(Payload):
    """A tool the model may call, in OpenAI's function-tool shape."""

    type: Literal["function"] = "function"
    function: FunctionSpec


class NamedFunction(Payload):
    name: str


class NamedToolChoice(Payload):
    """`tool_choice` naming the one function the model must call."""

    type: Literal["function"] = "function"
    function: NamedFunction


ToolChoice = Literal["auto", "none", "required"] | NamedToolChoice


class LLMConfig(Payload):
    """The design's LLMConfig — without `api_key`: keys live in the OS keychain only."""

    #: a logical model (an alias of the providers file), or `provider/model` for one
    #: provider's own model; None = the configured default (see docs/llm.md, "Models")
    model: str | None = Field(default=None, min_length=1, max_length=256)
    temperature: float | None = Field(default=None, ge=0, le=2)
    max_tokens: int | None = Field(default=None, ge=1)
    top_p: float | None = Field(default=None, ge=0, le=1)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    stop: list[str] | None = Field(default=None, max_length=16)
    api_endpoint: str | None = Field(default=None, max_length=2048)
    api_version: str | None = Field(default=None, max_length=64)
    organization: str | None = Field(default=None, max_length=256)
    #: structured output: passed to providers that take it, the answer checked against it
    response_format: ResponseFormat | None = None
    #: tools the model may call (OpenAI's function tools; each provider is sent its shape)
    tools: list[Tool] | None = Field(default=None, max_length=MAX_TOOLS)
    #: auto (the model decides), none, required (some tool), or one named function
    tool_choice: ToolChoice | None = None

    @model_validator(mode="after")
    def _choice_among_tools(self) -> LLMConfig:
        names = [t.function.name for t in self.tools or ()]
        if len(set(names)) != len(names):
            raise ValueError("tools: two tools have the same name")
        choice = self.tool_choice
        if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
            raise ValueError(f"tool_choice names {choice.function.name[:80]!r}, not a tool given")
        if choice == "required" and not names:
            raise ValueError("tool_choice required without tools")
        return self


@registry.register
class LLMRequest(Payload):
    """v2: `config` and its `model` may be left out (the configured default model);
    `config.response_format`. v3: `config.tools` / `tool_choice`, and messages carrying
    tool calls and tool results."""

    TYPE = "llm.request"
    VERSION = 3
    KEY_FIELD = "request_id"

    request_id: str = Field(min_length=1, max_length=MAX_ID_LENGTH)
    agent_id: str = Field(min_length=1, max_length=MAX_ID_LENGTH)
    #: registered provider name; None = the configured default
    provider: str | None = Field(default=None, max_length=128)
    #: providers tried in order when the first one fails or its breaker is open
    fallback: list[str] = Field(default_factory=list, max_length=8)
    stream: bool = True
    context: LLMContext
    config: LLMConfig = Field(default_factory=LLMConfig)
    #: shortens the operator's per-attempt timeout for this request (never lengthens it)
    timeout_s: float | None = Field(default=None, gt=0, le=3600)


@registry.register
class LLMStreamChunk(Payload):
    """v2: `tool_calls`, the streamed pieces of tool calls, in the order they came."""

    TYPE = "llm.chunk"
    VERSION = 2
    KEY_FIELD = "request_id"

    request_id: str = Field(max_length=MAX_ID_LENGTH)
    sequence: int = Field(ge=0)
    delta: str
    provider: str = ""
    attempt: int = 1
    tool_calls: list[ToolCallDelta] = Field(default_factory=list)


class Usage(Payload):
    prompt_tokens: int = Field(default=0, ge=0)
    completion_tokens: int = Field(default=0, ge=0)
    total_tokens: int = Field(default=0, ge=0)
    #: True when the provider sent no usage and it was estimated from text length
    estimated: bool = False


class AttemptRecord(Payload):
    provider: str
    attempt: int = Field(ge=1)
    #: skipped: the provider serves no model for the request's (error says why); it was
    #: not called
    outcome: Literal["ok", "error", "cancelled", "circuit_open", "skipped"]
    #: the provider's own model this attempt asked for ("" when skipped or unknown)
    model: str = ""
    error: str | None = None
    status_code: int | None = None
    latency_ms: float = 0.0
    retry_after_s: float | None = None


class ErrorInfo(Payload):
    error_class: str
    message: str
    retriable: bool = False


@registry.register
class LLMResponse(Payload):
    """v2: `alias`, `schema_valid` / `schema_error`, and attempts carry their `model` and
    may be `skipped`. v3: `tool_calls` and `finish_reason`. v4: status `budget_exceeded`
    (refused before any provider call; `error` names the budget)."""

    TYPE = "llm.response"
    VERSION = 4
    KEY_FIELD = "request_id"

    request_id: str = Field(max_length=MAX_ID_LENGTH)
    agent_id: str = Field(default="", max_length=MAX_ID_LENGTH)
    status: Literal["completed", "cancelled", "failed", "budget_exceeded"]
    content: str = ""
    usage: Usage | None = None
    provider: str = ""
    #: the model the provider answered with (its own name, e.g. gpt-4o-mini)
    model: str = ""
    #: the logical model the request asked for ("" when it named a provider's model
    #: itself, or the providers file declares no aliases)
    alias: str = Field(default="", max_length=256)
    attempts: list[AttemptRecord] = Field(default_factory=list)
    latency_ms: float = 0.0
    chunks: int = 0
    error: ErrorInfo | None = None
    #: with a `response_format` of json_schema / json_object and status completed: did
    #: `content` satisfy it (None: nothing was checked)
    schema_valid: bool | None = None
    #: why not, when `schema_valid` is False (where in the answer, and what)
    schema_error: str = Field(default="", max_length=1000)
    #: the complete tool calls of the answer, in index order
    tool_calls: list[ToolCall] = Field(default_factory=list, max_length=MAX_TOOL_CALLS)
    #: why the model stopped: stop, tool_calls, length, content_filter … ("" unknown)
    finish_reason: str = Field(default="", max_length=64)
    metadata: dict[str, Any] = Field(default_factory=dict)
    prev_hash: str = ""
    hash: str = ""
    #: the writing worker's Ed25519 signature over `hash` (see streams.audit_chain)
    signed_by: str = Field(default="", max_length=MAX_ID_LENGTH)
    signature: str = Field(default="", max_length=256)


@registry.register
class LLMCancelRequested(Payload):
    TYPE = "llm.cancel_requested"
    VERSION = 1
    KEY_FIELD = "request_id"

    request_id: str = Field(min_length=1, max_length=MAX_ID_LENGTH)
    reason: str = Field(default="", max_length=1024)


@registry.register
class BreakerStateChanged(Payload):
    TYPE = "llm.breaker_state_changed"
    VERSION = 1
    KEY_FIELD = "provider"

    provider: str = Field(max_length=128)
    previous: Literal["closed", "open", "half_open"]
    current: Literal["closed", "open", "half_open"]
    failures: int = 0
    changed_at: Time
    reason: str = ""


@registry.upcaster(LLMRequest.TYPE, 1)
def _llm_request_v1_to_v2(payload: dict[str, Any]) -> dict[str, Any]:
    """v1 always named a model; every v1 request is a valid v2 one as it is."""
    return payload


@registry.upcaster(LLMResponse.TYPE, 1)
def _llm_response_v1_to_v2(payload: dict[str, Any]) -> dict[str, Any]:
    """v1 had no alias, schema check nor skipped attempts; what it has means the same."""
    return payload


@registry.upcaster(LLMRequest.TYPE, 2)
def _llm_request_v2_to_v3(payload: dict[str, Any]) -> dict[str, Any]:
    """v2 had no tools; every v2 request is a valid v3 one as it is."""
    return payload


@registry.upcaster(LLMResponse.TYPE, 2)
def _llm_response_v2_to_v3(payload: dict[str, Any]) -> dict[str, Any]:
    """v2 had no tool calls nor finish reason (read as none and unknown)."""
    return payload


@registry.upcaster(LLMResponse.TYPE, 3)
def _llm_response_v3_to_v4(payload: dict[str, Any]) -> dict[str, Any]:
    """v3 had no budget refusals; its statuses mean the same."""
    return payload


@registry.upcaster(LLMStreamChunk.TYPE, 1)
def _llm_chunk_v1_to_v2(payload: dict[str, Any]) -> dict[str, Any]:
    """v1 chunks carried text only."""
    return payload
