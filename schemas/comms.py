"""Communication records (the design's CommunicationTracker, one kind per Redis key there)."""

from __future__ import annotations

from typing import Any, Literal, get_args

from pydantic import Field, ValidationInfo, field_validator

from agentstream.schemas.base import MAX_ID_LENGTH, Payload, Time
from agentstream.schemas.limits import COMMS_DETAILS, limits_apply
from agentstream.schemas.registry import registry

CommKind = Literal["communication", "blockchain", "model", "token", "wallet", "resource"]
COMM_KINDS: tuple[CommKind, ...] = get_args(CommKind)
#: a string without control characters (C0 and DEL)
NO_CONTROL = r"^[^\x00-\x1f\x7f]*$"


@registry.register
class CommunicationRecord(Payload):
    TYPE = "comms.record"
    VERSION = 1
    KEY_FIELD = "agent_id"

    # no control characters: the table keys join agent and record id with one (\x1f),
    # and a record whose id held it could not be found again after a restart
    record_id: str = Field(min_length=1, max_length=MAX_ID_LENGTH, pattern=NO_CONTROL)
    kind: CommKind
    agent_id: str = Field(min_length=1, max_length=MAX_ID_LENGTH, pattern=NO_CONTROL)
    counterparty: str = Field(default="", max_length=MAX_ID_LENGTH, pattern=NO_CONTROL)
    recorded_at: Time
    #: e.g. tokens moved, bytes transferred, gas used
    amount: float | None = Field(default=None, allow_inf_nan=False)
    unit: str = Field(default="", max_length=64)
    #: kept with the record in the comms table: bounded (`schemas.limits`)
    details: dict[str, Any] = Field(
        default_factory=dict, json_schema_extra=COMMS_DETAILS.json_schema()
    )

    @field_validator("details")
    @classmethod
    def _bounded_details(cls, value: dict[str, Any], validation: ValidationInfo) -> dict[str, Any]:
        return COMMS_DETAILS.check(value) if limits_apply(validation) else value
