"""Error recovery building blocks: retry policy by error type, and circuit breakers.

Both are pure classes (no I/O, injectable clock and randomness) so their decisions are
unit-tested without sleeping; the LLM processor wires them to real calls.
"""

from agentstream.streams.resilience.breaker import BreakerState, CircuitBreaker, Transition
from agentstream.streams.resilience.retry import RetryDecision, RetryPolicy

__all__ = ["BreakerState", "CircuitBreaker", "RetryDecision", "RetryPolicy", "Transition"]
