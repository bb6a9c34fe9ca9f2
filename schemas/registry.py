"""Maps an event's `type` back to its payload model, upcasting old versions on read.

Decoding is the one door every consumer goes through::

    bytes ──orjson──► dict ──type──► payload model ──(upcast v1→v2→…)──► Event[Model]

Every way that can fail ends in one `SchemaError` subclass, so a consumer catches one
class and dead-letters the input with the reason.

The producer limits (`schemas.limits`: bounds on free-form maps a worker keeps in its
tables) hold by default; readers of history pass ``limits=False`` so that a record
written before a bound existed stays readable.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import orjson
from pydantic import ValidationError

from agentstream.schemas.base import Event, Payload
from agentstream.schemas.errors import (
    InvalidEvent,
    UndecodableEvent,
    UnknownEventType,
    UnsupportedSchemaVersion,
)
from agentstream.schemas.limits import HISTORY

Upcaster = Callable[[dict[str, Any]], dict[str, Any]]

#: Upper bound for one encoded event; Kafka's default max.message.bytes is ~1 MiB.
DEFAULT_MAX_EVENT_BYTES = 1_000_000


class EventRegistry:
    """Type name → payload model, plus the upcasters between schema versions."""

    def __init__(self) -> None:
        self._models: dict[str, type[Payload]] = {}
        self._envelopes: dict[str, type[Event[Any]]] = {}
        self._upcasters: dict[tuple[str, int], Upcaster] = {}

    def register(self, model: type[Payload]) -> type[Payload]:
        if not model.TYPE:
            raise ValueError(f"{model.__name__} has no TYPE")
        known = self._models.get(model.TYPE)
        if known is not None and known is not model:
            raise ValueError(f"event type {model.TYPE!r} registered twice")
        self._models[model.TYPE] = model
        self._envelopes[model.TYPE] = Event[model]  # type: ignore[valid-type]
        return model

    def upcaster(self, type_: str, from_version: int) -> Callable[[Upcaster], Upcaster]:
        """Register `fn` turning a `from_version` payload dict into `from_version + 1`."""

        def deco(fn: Upcaster) -> Upcaster:
            self._upcasters[(type_, from_version)] = fn
            return fn

        return deco

    def model(self, type_: str) -> type[Payload]:
        try:
            return self._models[type_]
        except KeyError:
            raise UnknownEventType(f"unknown event type {type_!r}", type=type_) from None

    def envelope(self, type_: str) -> type[Event[Any]]:
        self.model(type_)
        return self._envelopes[type_]

    def types(self) -> list[str]:
        return sorted(self._models)

    def models(self) -> Iterable[type[Payload]]:
        return (self._models[t] for t in self.types())

    # -- decoding ---------------------------------------------------------------------
    def decode(
        self, raw: bytes | str, *, max_bytes: int = DEFAULT_MAX_EVENT_BYTES, limits: bool = True
    ) -> Event[Any]:
        """Bytes from Kafka → a validated, upcast event, or a `SchemaError`. `limits`:
        whether the producer limits hold (`schemas.limits`; False to read history)."""
        return self.parse(raw, max_bytes=max_bytes, limits=limits)[0]

    def parse(
        self, raw: bytes | str, *, max_bytes: int = DEFAULT_MAX_EVENT_BYTES, limits: bool = True
    ) -> tuple[Event[Any], dict[str, Any] | None]:
        """`decode`, plus the JSON object the event was validated from when it came at
        its current schema version (None when it was upcast): a stage forwarding the
        event unchanged writes that back instead of parsing the bytes a second time.
        The object is the caller's to change; the event holds no reference to its top
        level (nested values of `Any` fields may be shared with it)."""
        if raw is None:
            raise UndecodableEvent("empty value (tombstone or null)")
        if len(raw) > max_bytes:
            raise UndecodableEvent(f"event of {len(raw)} bytes exceeds the limit of {max_bytes}")
        try:
            data = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise UndecodableEvent(f"not JSON: {exc}") from None
        event = self.from_dict(data, limits=limits)
        return event, data if data["schema_version"] == event.schema_version else None

    def from_dict(self, data: Any, *, limits: bool = True) -> Event[Any]:
        if not isinstance(data, dict):
            raise UndecodableEvent(f"expected a JSON object, got {type(data).__name__}")
        type_ = data.get("type")
        if not isinstance(type_, str):
            raise InvalidEvent("missing or non-string field 'type'")
        model = self.model(type_)
        version = data.get("schema_version")
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise InvalidEvent("missing or invalid field 'schema_version'", type=type_)
        if version > model.VERSION:
            raise UnsupportedSchemaVersion(
                f"{type_} schema_version {version} is newer than the known {model.VERSION}",
                type=type_,
            )
        if version < model.VERSION:
            data = self._upcast(type_, version, model.VERSION, data)
        try:
            return self._envelopes[type_].model_validate(data, context=None if limits else HISTORY)
        except ValidationError as exc:
            raise InvalidEvent(_describe(type_, exc), type=type_) from None
        except Exception as exc:
            # pydantic passes some errors of its own conversions through (OverflowError
            # for a time or an integer out of range): whatever the input makes it raise is
            # this input's fault, a dead letter, never an exception that escapes decoding
            # and brings the record back after every restart
            raise InvalidEvent(
                f"{type_}: {type(exc).__name__}: {str(exc)[:200]}", type=type_
            ) from None

    def _upcast(
        self, type_: str, version: int, target: int, data: dict[str, Any]
    ) -> dict[str, Any]:
        payload = data.get("payload")
        if not isinstance(payload, dict):
            raise InvalidEvent("missing or non-object field 'payload'", type=type_)
        while version < target:
            fn = self._upcasters.get((type_, version))
            if fn is None:
                raise UnsupportedSchemaVersion(
                    f"no upcaster for {type_} from schema_version {version}", type=type_
                )
            try:
                payload = fn(dict(payload))
            except (KeyError, TypeError, ValueError) as exc:
                raise InvalidEvent(f"cannot upcast {type_} v{version}: {exc}", type=type_) from None
            version += 1
        return {**data, "payload": payload, "schema_version": target}


def encode(event: Event[Any]) -> bytes:
    """An event → its wire bytes (orjson; UUIDs and datetimes in ISO form)."""
    return orjson.dumps(event.model_dump(), option=orjson.OPT_UTC_Z)


def _describe(type_: str, exc: ValidationError) -> str:
    parts = []
    for err in exc.errors(include_url=False)[:5]:
        # a location holds the input's own keys: quoted when they are not plain names,
        # so that no key can add a line or an escape to the message (logs, dead letters)
        loc = ".".join(
            p if isinstance(p, str) and p.isidentifier() else repr(p) for p in err["loc"]
        )
        loc = loc or "<root>"
        parts.append(f"{loc}: {err['msg']}")
    more = exc.error_count() - len(parts)
    suffix = f" (+{more} more)" if more > 0 else ""
    return f"invalid {type_}: " + "; ".join(parts) + suffix


#: The process-wide registry; domain modules register into it at import time.
registry = EventRegistry()
