"""Is a server process this project started still alive? Shared by the Kafka launcher and
the Toxiproxy server (standard library only, like both)."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable
from pathlib import Path


def pid_alive(
    pid: int,
    children: dict[int, subprocess.Popen[bytes]],
    is_ours: Callable[[list[bytes]], bool],
) -> bool:
    """True if ``pid`` is a live, non-zombie process whose command line `is_ours` accepts.

    A child this process started (in `children`) is asked directly and reaped once it has
    exited; otherwise a signal 0 tells whether the pid exists, and procfs (where there is
    one) whether it is a zombie and still the same program: a pid file can outlive its
    process and the pid be reused."""
    child = children.get(pid)
    if child is not None:
        if child.poll() is None:
            return True
        del children[pid]
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    proc = Path("/proc") / str(pid)
    if not proc.is_dir():
        return True  # no procfs (macOS): trust the signal check
    try:
        stat = (proc / "stat").read_text()
        cmdline = (proc / "cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    if stat.rpartition(")")[2].strip().startswith(("Z", "X")):
        return False
    return is_ours(cmdline)
