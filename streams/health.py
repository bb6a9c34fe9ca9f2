"""A registry of component health checks, read by the /ready view.

Components register an async check returning `(status, detail)` where status is
"ok", "degraded" or "down". Keeping the registry in `streams` lets any agent register
its checks without agents importing each other.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Literal

Status = Literal["ok", "degraded", "down"]
Check = Callable[[], Awaitable[tuple[Status, str]]]

CHECKS: dict[str, Check] = {}


def register_check(component: str, check: Check) -> None:
    CHECKS[component] = check
