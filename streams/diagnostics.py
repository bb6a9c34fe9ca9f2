"""What every asyncio task of a worker is waiting for, on demand: ``kill -USR2 <pid>``.

Faust's worker already prints all stacks on SIGUSR1, but an asyncio task's stack there is
only its outermost coroutine: for an agent, Faust's ``_execute_actor`` at ``await coro``,
never the line of the agent that waits. This walks each task's await chain instead
(coroutine → the coroutine it awaits → … → the future at the bottom) and logs it, one
line per frame, so a stalled worker shows e.g. ``enforce_policy`` waiting in
``ChainWriter.head``. Where an awaitable hides what it runs (an object's ``__await__``,
an ``async for`` step) the collector's referents lead on.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

#: frames followed per task (await chains are short; this bounds a pathological one)
MAX_DEPTH = 64
MARK = "asyncio task dump"


def await_chain(task: asyncio.Task[Any], _seen: set[int] | None = None) -> list[str]:
    """The frames a task is suspended in, outermost first, then what the innermost one
    awaits; when that is another task, its chain follows (indented)."""
    seen = _seen if _seen is not None else set()
    seen.add(id(task))
    out: list[str] = []
    obj: Any = task.get_coro()
    for _ in range(MAX_DEPTH):
        frame = _frame(obj)
        if frame is None:
            # an awaitable's iterator (`__await__` of an object, an `async for` step)
            # hides what it runs; the collector's referents show it
            obj = next((r for r in gc.get_referents(obj) if _frame(r) is not None), obj)
            frame = _frame(obj)
            if frame is None:
                break
        code = frame.f_code
        out.append(f"{code.co_filename}:{frame.f_lineno} in {code.co_qualname}")
        nxt = getattr(obj, "cr_await", None) or getattr(obj, "gi_yieldfrom", None)
        obj = nxt or getattr(obj, "ag_await", None)
        if obj is None:
            break
    # what the task is blocked on: asyncio keeps it on the task (the coroutine only holds
    # an iterator over it)
    waiter = getattr(task, "_fut_waiter", None)
    if isinstance(waiter, asyncio.Task) and id(waiter) not in seen:
        out.append(f"awaiting task {waiter.get_name()}:")
        out.extend(f"  {line}" for line in await_chain(waiter, seen))
    elif waiter is not None:
        out.append(f"awaiting {_short(waiter)}")
    elif obj is not None:
        out.append(f"awaiting {_short(obj)}")
    return out


def _frame(obj: Any) -> Any:
    """The suspended frame of a coroutine, generator or async generator (else None)."""
    return (
        getattr(obj, "cr_frame", None)
        or getattr(obj, "gi_frame", None)
        or getattr(obj, "ag_frame", None)
    )


def dump_tasks(
    loop: asyncio.AbstractEventLoop | None = None,
    extra: Callable[[], list[str]] | None = None,
) -> str:
    """Every task of the loop with its await chain, as text; then `extra`'s lines (the
    worker adds its consumer's partition state: an agent idle on its queue is only half
    the story)."""
    tasks = sorted(asyncio.all_tasks(loop), key=lambda t: t.get_name())
    lines = [f"{MARK}: {len(tasks)} tasks"]
    for task in tasks:
        lines.append(f"TASK {task.get_name()} {_short(task.get_coro())}")
        lines.extend(f"    {frame}" for frame in await_chain(task))
    if extra is not None:
        try:
            lines.extend(extra())
        except Exception as exc:  # a diagnosis must not fail on what it diagnoses
            lines.append(f"(more state unavailable: {type(exc).__name__}: {exc})")
    lines.append(f"end of {MARK}")
    return "\n".join(lines)


def install(loop: asyncio.AbstractEventLoop, extra: Callable[[], list[str]] | None = None) -> bool:
    """Log `dump_tasks` on SIGUSR2 (where the platform has it); returns whether it could."""
    sig = getattr(signal, "SIGUSR2", None)
    if sig is None:
        return False
    with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
        loop.add_signal_handler(sig, lambda: log.warning("%s", dump_tasks(loop, extra)))
        return True
    return False


def _short(obj: Any, limit: int = 160) -> str:
    text = repr(obj)
    return text if len(text) <= limit else text[: limit - 1] + "…"
