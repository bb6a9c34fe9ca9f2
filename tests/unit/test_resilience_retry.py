"""The retry policy picks delays by error type and stops where the issue says it must."""

from __future__ import annotations

import pytest

from agentstream.streams.errors import (
    CircuitOpen,
    ProviderConnectionError,
    ProviderProtocolError,
    ProviderRateLimited,
    ProviderRequestError,
    ProviderServerError,
    ProviderTimeout,
    RequestCancelled,
)
from agentstream.streams.resilience import RetryPolicy


def policy(rng: float = 0.5, **kw: float) -> RetryPolicy:
    return RetryPolicy(rng=lambda: rng, **kw)  # type: ignore[arg-type]


def test_rate_limit_honours_retry_after() -> None:
    d = policy().decide(ProviderRateLimited("slow down", retry_after_s=1.5), attempt=1)
    assert d.retry and d.delay_s == 1.5


def test_overloaded_server_retry_after_is_honoured_too() -> None:
    """503 / Anthropic's 529 with Retry-After: the server said when; without, backoff."""
    d = policy().decide(ProviderServerError("529", retry_after_s=0.7), attempt=1)
    assert d.retry and d.delay_s == 0.7 and d.reason == "retry-after"
    d = policy(max_delay_s=2.0).decide(ProviderServerError("x", retry_after_s=30), attempt=1)
    assert not d.retry
    d = policy(rng=1.0, base_delay_s=0.1).decide(ProviderServerError("x"), attempt=1)
    assert d.retry and d.delay_s == pytest.approx(0.1)


def test_rate_limit_longer_than_max_delay_gives_up() -> None:
    d = policy(max_delay_s=2.0).decide(ProviderRateLimited("x", retry_after_s=30), attempt=1)
    assert not d.retry and "Retry-After" in d.reason


def test_rate_limit_without_header_backs_off() -> None:
    d = policy(rng=1.0, base_delay_s=0.1).decide(ProviderRateLimited("x"), attempt=2)
    assert d.retry and d.delay_s == pytest.approx(0.2)


@pytest.mark.parametrize(
    "exc",
    [ProviderServerError("500"), ProviderConnectionError("reset"), ProviderProtocolError("x")],
)
def test_server_and_connection_errors_back_off_exponentially(exc: Exception) -> None:
    p = policy(rng=1.0, base_delay_s=0.1, max_delay_s=0.5, max_attempts=10)
    delays = [p.decide(exc, attempt=n).delay_s for n in range(1, 6)]
    assert delays == pytest.approx([0.1, 0.2, 0.4, 0.5, 0.5])


def test_jitter_spreads_delays_within_half() -> None:
    low = policy(rng=0.0, base_delay_s=1.0).backoff(1)
    high = policy(rng=1.0, base_delay_s=1.0).backoff(1)
    assert low == pytest.approx(0.5) and high == pytest.approx(1.0)


def test_timeouts_are_retried_a_bounded_number_of_times() -> None:
    p = policy(max_attempts=10, max_timeout_retries=2)
    assert p.decide(ProviderTimeout("t"), attempt=1, timeouts_so_far=1).retry
    assert p.decide(ProviderTimeout("t"), attempt=2, timeouts_so_far=2).retry
    assert not p.decide(ProviderTimeout("t"), attempt=3, timeouts_so_far=3).retry


@pytest.mark.parametrize(
    "exc",
    [
        ProviderRequestError("400", status_code=400),
        CircuitOpen("open"),
        RequestCancelled("c"),
        ValueError("bug"),
    ],
)
def test_non_retriable_fail_at_once(exc: Exception) -> None:
    assert not policy().decide(exc, attempt=1).retry


def test_max_attempts_stops_retries() -> None:
    p = policy(max_attempts=3)
    assert p.decide(ProviderServerError("x"), attempt=2).retry
    assert not p.decide(ProviderServerError("x"), attempt=3).retry


def test_retriable_flag_per_instance_wins() -> None:
    assert not policy().decide(ProviderServerError("x", retriable=False), attempt=1).retry
