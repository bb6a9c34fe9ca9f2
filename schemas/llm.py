"""LLM requests, streamed chunks, final responses, cancellations and breaker transitions."""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import AwareDatetime, Field, model_validator

from agentstream.schemas.base import MAX_ID_LENGTH, Payload
from agentstream.schemas.messages import check_tree
from agentstream.schemas.registry import registry


class ChatMessage(Payload):
    role: Literal["system", "user", "assistant", "tool"]
    content: str


class LLMContext(Payload):
    """What the model is asked: the conversation plus optional system prompt."""

    messages: list[ChatMessage] = Field(min_length=1, max_length=1024)
    system_prompt: str | None = None
    #: the Midscene-style adapter adds web search results when set
    web_search_query: str | None = Field(default=None, max_length=1024)
    metadata: dict[str, Any] = Field(default_factory=dict)


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


@registry.register
class LLMRequest(Payload):
    """v2: `config` and its `model` may be left out (the configured default model);
    `config.response_format`."""

    TYPE = "llm.request"
    VERSION = 2
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
    timeout_s: float | None = Field(default=None, gt=0, le=3600)


@registry.register
class LLMStreamChunk(Payload):
    TYPE = "llm.chunk"
    VERSION = 1
    KEY_FIELD = "request_id"

    request_id: str = Field(max_length=MAX_ID_LENGTH)
    sequence: int = Field(ge=0)
    delta: str
    provider: str = ""
    attempt: int = 1


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
    may be `skipped`."""

    TYPE = "llm.response"
    VERSION = 2
    KEY_FIELD = "request_id"

    request_id: str = Field(max_length=MAX_ID_LENGTH)
    agent_id: str = Field(default="", max_length=MAX_ID_LENGTH)
    status: Literal["completed", "cancelled", "failed"]
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
    changed_at: AwareDatetime
    reason: str = ""


@registry.upcaster(LLMRequest.TYPE, 1)
def _llm_request_v1_to_v2(payload: dict[str, Any]) -> dict[str, Any]:
    """v1 always named a model; every v1 request is a valid v2 one as it is."""
    return payload


@registry.upcaster(LLMResponse.TYPE, 1)
def _llm_response_v1_to_v2(payload: dict[str, Any]) -> dict[str, Any]:
    """v1 had no alias, schema check nor skipped attempts; what it has means the same."""
    return payload
