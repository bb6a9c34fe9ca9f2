"""A circuit breaker per provider, as a pure state machine with an injectable clock.

    closed ──(threshold failures within window)──► open ──(reset timeout)──► half_open
      ▲                                              ▲                          │
      └──────────────(probe succeeded)───────────────┴──────(probe failed)──────┘

While open, `allow()` says no without calling the provider (fail fast). After the reset
timeout one probe is let through; its outcome closes or re-opens the breaker. Every
transition is reported to `on_transition` so the agent can publish it and keep the state
in a table.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal

BreakerState = Literal["closed", "open", "half_open"]


@dataclass(frozen=True, slots=True)
class Transition:
    name: str
    previous: BreakerState
    current: BreakerState
    failures: int
    at: datetime
    reason: str


class CircuitBreaker:
    def __init__(
        self,
        name: str,
        *,
        failure_threshold: int = 5,
        window_s: float = 30.0,
        reset_timeout_s: float = 15.0,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        on_transition: Callable[[Transition], None] | None = None,
    ) -> None:
        self.name = name
        self.failure_threshold = failure_threshold
        self.window_s = window_s
        self.reset_timeout_s = reset_timeout_s
        self._clock = clock
        self._wall = wall_clock
        self._on_transition = on_transition
        self._state: BreakerState = "closed"
        self._failures: deque[float] = deque()
        self._opened_at = 0.0
        self._probe_in_flight = False

    @property
    def state(self) -> BreakerState:
        return self._state

    @property
    def failures(self) -> int:
        self._prune()
        return len(self._failures)

    def retry_in_s(self) -> float:
        """Seconds until an open breaker lets a probe through (0 when not open)."""
        if self._state != "open":
            return 0.0
        return max(0.0, self.reset_timeout_s - (self._clock() - self._opened_at))

    def allow(self) -> bool:
        """May a call go to the provider now? In half-open, exactly one probe may."""
        if self._state == "closed":
            return True
        if self._state == "open":
            if self._clock() - self._opened_at < self.reset_timeout_s:
                return False
            self._move("half_open", "reset timeout elapsed, probing")
        if self._probe_in_flight:
            return False
        self._probe_in_flight = True
        return True

    def record_success(self) -> None:
        if self._state == "half_open":
            self._probe_in_flight = False
            self._failures.clear()
            self._move("closed", "probe succeeded")
        elif self._state == "closed":
            # a success means the provider works: old failures no longer predict much
            self._failures.clear()

    def record_failure(self, reason: str = "") -> None:
        now = self._clock()
        if self._state == "half_open":
            self._probe_in_flight = False
            self._failures.append(now)
            self._opened_at = now
            self._move("open", f"probe failed: {reason}".rstrip(": "))
            return
        if self._state == "open":
            return
        self._failures.append(now)
        self._prune()
        if len(self._failures) >= self.failure_threshold:
            self._opened_at = now
            self._move(
                "open",
                f"{len(self._failures)} failures within {self.window_s:g}s: {reason}".rstrip(": "),
            )

    def release(self) -> None:
        """The probe ended with neither success nor failure (e.g. cancelled): let another."""
        if self._state == "half_open":
            self._probe_in_flight = False

    def snapshot(self) -> dict[str, object]:
        return {
            "state": self._state,
            "failures": self.failures,
            "retry_in_s": round(self.retry_in_s(), 3),
        }

    def _prune(self) -> None:
        horizon = self._clock() - self.window_s
        while self._failures and self._failures[0] < horizon:
            self._failures.popleft()

    def _move(self, current: BreakerState, reason: str) -> None:
        previous, self._state = self._state, current
        if self._on_transition is not None and previous != current:
            self._on_transition(
                Transition(self.name, previous, current, len(self._failures), self._wall(), reason)
            )
