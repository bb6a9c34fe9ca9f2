"""The fault-injection hook `fault_point` (``AGENTSTREAM_TEST_FAULTS``).

The chaos runner's `agent_raises` arms every worker process with a time (``point@Ts``):
a call number would land after the load ends on a delivery path that cuts the same load
into fewer, larger batches (the native path), and the run would test nothing.
"""

from __future__ import annotations

import pytest

from agentstream.streams import processing
from agentstream.streams.processing import InjectedFault, fault_point, parse_faults


@pytest.fixture
def faults(monkeypatch: pytest.MonkeyPatch) -> dict[str, int | float]:
    armed: dict[str, int | float] = {}
    monkeypatch.setattr(processing, "_FAULTS", armed)
    monkeypatch.setattr(processing, "_FAULT_CALLS", {})
    monkeypatch.setattr(processing, "_FAULT_FIRST", {})
    monkeypatch.setattr(processing, "_FAULT_FIRED", set())
    return armed


def test_the_spec_reads_call_numbers_and_times() -> None:
    assert parse_faults("a@3, b@2.5s ,c@, @4, d@x, e@1.5") == {"a": 3, "b": 2.5}
    assert parse_faults("") == {}


def test_a_call_number_fires_at_that_call_once(faults: dict[str, int | float]) -> None:
    faults["p"] = 3
    fault_point("p")
    fault_point("p")
    with pytest.raises(InjectedFault, match=r"at p \(call 3\)"):
        fault_point("p")
    for _ in range(5):
        fault_point("p")  # once only
    fault_point("other")


def test_a_time_fires_at_the_first_call_that_late(
    faults: dict[str, int | float], monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = [100.0]
    monkeypatch.setattr(processing.time, "monotonic", lambda: clock[0])
    faults["p"] = 2.0
    fault_point("p")  # the first call starts the clock
    clock[0] = 101.9
    for _ in range(50):  # however many batches come within the time
        fault_point("p")
    clock[0] = 102.0
    with pytest.raises(InjectedFault, match=r"call 52"):
        fault_point("p")
    clock[0] = 500.0
    fault_point("p")  # once only
