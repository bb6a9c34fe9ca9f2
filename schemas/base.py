"""The envelope every event travels in, and the base class of every payload.

An event on the wire is one JSON object::

    {"event_id": "...", "type": "agent.message", "schema_version": 2,
     "occurred_at": "2026-11-25T10:00:00.123456Z", "source": "agent-7",
     "correlation_id": "...", "causation_id": null, "payload": {...}}

`type` is the discriminator: the registry maps it back to the payload model, and upcasts
payloads written with an older `schema_version` before validation (eventsourcing-style).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any, ClassVar, Generic, TypeVar, cast
from uuid import UUID, uuid4

from pydantic import AfterValidator, AwareDatetime, BaseModel, ConfigDict, Field, field_validator

MAX_ID_LENGTH = 256


OUT_OF_UTC_RANGE = "out of the range of times in UTC"


def _in_utc_range(value: datetime) -> datetime:
    """A time a sender wrote must exist in UTC: 9999-12-31T23:59:59-14:00 is year 10000
    there, and converting it (`astimezone`, `fromtimestamp`, which tables and monitors
    do) raises OverflowError or ValueError far from decoding, outside the dead-letter
    path. Kept as written (a signed time's text is part of what was signed)."""
    try:
        value.astimezone(UTC)
    except OverflowError:
        raise ValueError(OUT_OF_UTC_RANGE) from None
    return value


#: an aware datetime that exists in UTC: every time field of a payload
Time = Annotated[AwareDatetime, AfterValidator(_in_utc_range)]


def utc_now() -> datetime:
    return datetime.now(UTC)


class Payload(BaseModel):
    """Base of every payload model.

    Subclasses set `TYPE` (the dotted event type) and `VERSION` (the current schema
    version); `schemas.registry` collects them. Unknown fields are rejected so that a
    producer's typo becomes a dead letter instead of silently lost data.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, str_max_length=8 * 1024 * 1024)

    TYPE: ClassVar[str] = ""
    VERSION: ClassVar[int] = 1
    #: Which payload field carries the Kafka key (agent id, request id ...); None = event id.
    KEY_FIELD: ClassVar[str | None] = None


P = TypeVar("P", bound=Payload)


class Event(BaseModel, Generic[P]):
    """The envelope. Build one with `Event.of(payload, source=...)`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    event_id: UUID = Field(default_factory=uuid4)
    type: str = Field(min_length=1, max_length=128)
    schema_version: int = Field(ge=1)
    occurred_at: AwareDatetime = Field(default_factory=utc_now)
    source: str = Field(min_length=1, max_length=MAX_ID_LENGTH)
    correlation_id: str = Field(default="", max_length=MAX_ID_LENGTH)
    causation_id: str | None = Field(default=None, max_length=MAX_ID_LENGTH)
    payload: P

    @field_validator("occurred_at")
    @classmethod
    def _to_utc(cls, value: datetime) -> datetime:
        # one conversion, checked as `_in_utc_range` checks it: this runs for every
        # event a worker decodes
        try:
            return value.astimezone(UTC)
        except OverflowError:
            raise ValueError(OUT_OF_UTC_RANGE) from None

    @classmethod
    def of(
        cls,
        payload: P,
        *,
        source: str,
        correlation_id: str | None = None,
        causation_id: str | None = None,
        occurred_at: datetime | None = None,
        event_id: UUID | None = None,
    ) -> Event[P]:
        """Wrap a payload in a fresh envelope; the correlation id defaults to the event id."""
        eid = event_id or uuid4()
        envelope: Any = cast(Any, Event)[type(payload)]
        return cast(
            "Event[P]",
            envelope(
                event_id=eid,
                type=payload.TYPE,
                schema_version=payload.VERSION,
                occurred_at=occurred_at or utc_now(),
                source=source,
                correlation_id=correlation_id or str(eid),
                causation_id=causation_id,
                payload=payload,
            ),
        )

    def caused(self, payload: Payload, *, source: str) -> Event[Any]:
        """A follow-up event: same correlation id, causation id = this event's id."""
        return Event.of(
            payload,
            source=source,
            correlation_id=self.correlation_id or str(self.event_id),
            causation_id=str(self.event_id),
        )

    @property
    def key(self) -> str:
        """The Kafka key this event is published under (see `Payload.KEY_FIELD`)."""
        field = self.payload.KEY_FIELD
        if field is None:
            return str(self.event_id)
        return str(getattr(self.payload, field))

    def to_wire(self) -> dict[str, Any]:
        return self.model_dump(mode="json")
