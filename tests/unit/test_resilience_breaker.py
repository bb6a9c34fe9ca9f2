"""Circuit breaker transitions, driven by a fake clock."""

from __future__ import annotations

from agentstream.streams.resilience import CircuitBreaker, Transition


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make(clock: Clock, seen: list[Transition]) -> CircuitBreaker:
    return CircuitBreaker(
        "p",
        failure_threshold=3,
        window_s=10,
        reset_timeout_s=5,
        clock=clock,
        on_transition=seen.append,
    )


def test_opens_after_threshold_within_window_and_fails_fast() -> None:
    clock, seen = Clock(), []
    b = make(clock, seen)
    for _ in range(2):
        b.record_failure("500")
    assert b.state == "closed" and b.allow()
    b.record_failure("500")
    assert b.state == "open"
    assert not b.allow()
    assert [(t.previous, t.current) for t in seen] == [("closed", "open")]
    assert seen[0].failures == 3 and "500" in seen[0].reason


def test_failures_outside_window_do_not_count() -> None:
    clock, seen = Clock(), []
    b = make(clock, seen)
    b.record_failure()
    b.record_failure()
    clock.now += 11
    b.record_failure()
    assert b.state == "closed" and b.failures == 1 and not seen


def test_success_in_closed_state_clears_failures() -> None:
    clock, seen = Clock(), []
    b = make(clock, seen)
    b.record_failure()
    b.record_failure()
    b.record_success()
    b.record_failure()
    assert b.state == "closed"


def test_half_open_single_probe_then_close() -> None:
    clock, seen = Clock(), []
    b = make(clock, seen)
    for _ in range(3):
        b.record_failure()
    clock.now += 4.9
    assert not b.allow() and b.retry_in_s() > 0
    clock.now += 0.2
    assert b.allow()  # the probe
    assert b.state == "half_open"
    assert not b.allow()  # only one probe at a time
    b.record_success()
    assert b.state == "closed" and b.allow()
    assert [(t.previous, t.current) for t in seen] == [
        ("closed", "open"),
        ("open", "half_open"),
        ("half_open", "closed"),
    ]


def test_failed_probe_reopens_for_a_full_reset_timeout() -> None:
    clock, seen = Clock(), []
    b = make(clock, seen)
    for _ in range(3):
        b.record_failure()
    clock.now += 5
    assert b.allow()
    b.record_failure("still down")
    assert b.state == "open"
    clock.now += 4
    assert not b.allow()
    clock.now += 1
    assert b.allow()
    assert [t.current for t in seen] == ["open", "half_open", "open", "half_open"]


def test_released_probe_lets_another_through() -> None:
    clock, seen = Clock(), []
    b = make(clock, seen)
    for _ in range(3):
        b.record_failure()
    clock.now += 5
    assert b.allow()
    b.release()
    assert b.allow()
