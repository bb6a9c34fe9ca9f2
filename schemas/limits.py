"""Bounds on the free-form fields a producer fills: maps and JSON trees.

A producer controls every byte of what it writes. A heartbeat's `info`, a metric
sample's `labels` or a communication record's `details` is kept by a worker in a table
(and its compacted changelog) per agent or label set, restored on every restart and
scanned by views and scrapes: one record holding half a megabyte there, under a fresh
agent id each time, grows them by that much per record. So these fields are bounded by
what real use needs, far below the size of an event; an event over a bound is invalid
(a dead letter, `InvalidEvent`). docs/events.md lists the bounds.

The bounds are *producer limits*: they hold wherever an event is made or taken in —
building a payload, the client's publish, a worker decoding its input, a rebuild of a
table (which must refuse what the live fold refused). Reading history is different: a
record written before a bound existed, or an output the pipeline extended itself (a
rejected message carries the rejection reasons in its metadata on top of the sender's),
must stay readable by `replay`, `tail`, `audit report` and the client's subscriptions.
Those validate with `HISTORY` as pydantic's validation context (`EventRegistry.decode(...,
limits=False)`): every other rule of the schema applies, these bounds do not.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson
from pydantic import ValidationInfo

#: the validation context key that switches the producer limits off (`HISTORY`)
LIMITS_KEY = "agentstream.producer_limits"
#: the validation context of readers of history: the producer limits do not apply
HISTORY: dict[str, Any] = {LIMITS_KEY: False}


def limits_apply(info: ValidationInfo) -> bool:
    """Whether the producer limits hold for this validation (all but `HISTORY` reads)."""
    context = info.context
    return not (isinstance(context, dict) and context.get(LIMITS_KEY) is False)


@dataclass(frozen=True)
class MapLimits:
    """A ``dict[str, str]``: how many entries, how long a key and a value may be (in
    characters), and how many characters its keys and values may hold together."""

    entries: int
    key_chars: int
    value_chars: int
    total_chars: int

    def check(self, value: dict[str, str]) -> dict[str, str]:
        if len(value) > self.entries:
            raise ValueError(f"{len(value)} entries, at most {self.entries}")
        total = 0
        for k, v in value.items():
            if len(k) > self.key_chars:
                raise ValueError(
                    f"key {k[:40]!r}... is {len(k)} characters long, at most {self.key_chars}"
                )
            if len(v) > self.value_chars:
                raise ValueError(
                    f"value of {k[:40]!r} is {len(v)} characters long, at most {self.value_chars}"
                )
            total += len(k) + len(v)
        if total > self.total_chars:
            raise ValueError(
                f"keys and values hold {total} characters together, at most {self.total_chars}"
            )
        return value

    def json_schema(self) -> dict[str, Any]:
        """The bounds as JSON Schema (`agentstream schemas export`), for producers."""
        return {
            "maxProperties": self.entries,
            "propertyNames": {"maxLength": self.key_chars},
            "additionalProperties": {"type": "string", "maxLength": self.value_chars},
            "description": (
                f"at most {self.entries} entries, keys of at most {self.key_chars} and values "
                f"of at most {self.value_chars} characters, {self.total_chars} in all"
            ),
        }


@dataclass(frozen=True)
class TreeLimits:
    """A JSON object of any shape: how deep it may nest, how many keys and values it may
    hold, and how large it may be encoded as JSON (bytes)."""

    depth: int
    items: int
    json_bytes: int

    def check(self, value: Any) -> Any:
        check_tree(value, max_depth=self.depth, max_items=self.items)
        check_json_size(value, self.json_bytes)
        return value

    def json_schema(self) -> dict[str, Any]:
        return {
            "description": (
                f"nested at most {self.depth} levels deep, at most {self.items} keys and "
                f"values, at most {self.json_bytes} bytes as JSON"
            ),
        }


def check_tree(value: Any, *, max_depth: int, max_items: int) -> None:
    """Raise ValueError when a JSON tree nests deeper or holds more items than allowed
    (iterative: a hostile tree cannot exhaust the stack)."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    items = 0
    while stack:
        node, depth = stack.pop()
        children = node.values() if isinstance(node, dict) else node
        if depth > max_depth:
            raise ValueError(f"nested deeper than {max_depth} levels")
        for child in children:
            items += 1
            if items > max_items:
                raise ValueError(f"holds more than {max_items} keys and values")
            if isinstance(child, dict | list):
                stack.append((child, depth + 1))


def check_json_size(value: Any, limit: int) -> None:
    """Raise ValueError when `value` (a tree `check_tree` bounded) is larger than `limit`
    bytes as JSON."""
    if not value:
        return
    try:
        size = len(orjson.dumps(value))
    except orjson.JSONEncodeError as exc:  # only a payload built in Python can get here
        raise ValueError(f"not JSON: {exc}") from None
    if size > limit:
        raise ValueError(f"{size} bytes as JSON, at most {limit}")


#: `agent.heartbeat` `info`: a version, a host name, a build ... (the chaos suite's mark)
HEARTBEAT_INFO = MapLimits(entries=64, key_chars=128, value_chars=1024, total_chars=8192)
#: `metrics.sample` `labels` (32 entries was the bound before these): Prometheus-style
#: label names and values; exported as one JSON label value on `/metrics`
METRIC_LABELS = MapLimits(entries=32, key_chars=128, value_chars=256, total_chars=4096)
#: `comms.record` `details`: a model name, a transaction hash, gas used ...
COMMS_DETAILS = TreeLimits(depth=16, items=1000, json_bytes=16 * 1024)
#: `agent.message` `metadata` (depth and items were bounded before: re-encoding) and
#: `llm.request` `context.metadata`; the size matches a policy's default
#: `max_message_size`, which holds metadata (as JSON) to the same number of bytes
MESSAGE_METADATA = TreeLimits(depth=16, items=10_000, json_bytes=64 * 1024)
