"""Which failures are retried, and after how long.

The strategy follows the error type, read through `PipelineError.retriable` and the
provider error classes:

* 429 rate limited, and 5xx with a `Retry-After` (503, Anthropic's 529 overloaded): wait
  what it says (if it is longer than `max_delay_s`, give up on this provider instead of
  stalling the request); without the header, back off.
* 5xx, connection errors, malformed streams: exponential backoff with jitter.
* timeouts: backoff too, but at most `max_timeout_retries` times (a hung provider eats
  the whole per-attempt timeout every time).
* other 4xx and anything not retriable: fail at once.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field

from agentstream.streams.errors import ProviderRateLimited, ProviderServerError, ProviderTimeout


def retry_after_of(exc: BaseException) -> float | None:
    """The wait a provider asked for: a 429's Retry-After, or a 503's / 529's."""
    if isinstance(exc, ProviderRateLimited | ProviderServerError):
        return exc.retry_after_s
    return None


@dataclass(frozen=True, slots=True)
class RetryDecision:
    retry: bool
    delay_s: float = 0.0
    reason: str = ""


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = 4
    base_delay_s: float = 0.2
    max_delay_s: float = 10.0
    max_timeout_retries: int = 2
    #: fraction of each backoff delay that is randomised ("equal jitter" at 0.5)
    jitter: float = 0.5
    rng: Callable[[], float] = field(default=random.random, compare=False)

    def backoff(self, attempt: int) -> float:
        """Delay after the `attempt`-th failure (1-based): base·2^(n-1), capped, jittered."""
        raw = min(self.max_delay_s, self.base_delay_s * (2 ** max(0, attempt - 1)))
        return raw * (1.0 - self.jitter) + raw * self.jitter * self.rng()

    def decide(self, exc: BaseException, attempt: int, timeouts_so_far: int = 0) -> RetryDecision:
        """Retry after failure number `attempt` (1-based)? `timeouts_so_far` includes `exc`."""
        kind = type(exc).__name__
        if not getattr(exc, "retriable", False):
            return RetryDecision(False, reason=f"{kind} is not retriable")
        if attempt >= self.max_attempts:
            return RetryDecision(False, reason=f"{attempt} of {self.max_attempts} attempts used")
        retry_after = retry_after_of(exc)
        if retry_after is not None:
            if retry_after > self.max_delay_s:
                return RetryDecision(
                    False,
                    reason=f"Retry-After {retry_after:g}s exceeds {self.max_delay_s:g}s",
                )
            return RetryDecision(True, max(0.0, retry_after), "retry-after")
        if isinstance(exc, ProviderTimeout) and timeouts_so_far > self.max_timeout_retries:
            return RetryDecision(False, reason=f"{timeouts_so_far} timeouts")
        return RetryDecision(True, self.backoff(attempt), kind)
