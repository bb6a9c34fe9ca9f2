"""SystemMonitor: this worker's memory and the disk usage the design asks for (psutil).

Memory, mapped from the design's Node.js figures to a CPython process:

* ``rss`` — resident set size of the process (psutil).
* ``heap_used`` — bytes the C allocator has handed out and not freed: glibc's
  ``mallinfo2()`` ``uordblks + hblkhd`` (all Python objects live there or in pymalloc
  arenas, which are themselves malloc/mmap allocations). Without glibc: the size of
  pymalloc's allocated blocks estimated as ``sys.getallocatedblocks() * 64``.
* ``heap_total`` — bytes the allocator holds from the OS (``arena + hblkhd``), i.e.
  used + free-but-not-returned; without glibc: the process' data segment (psutil).
* ``external`` — resident memory that is not the heap: shared libraries and mapped
  files (psutil ``shared``) — the closest thing to Node's native "external" memory.

tracemalloc would give exact Python figures but slows every allocation; these cost a
few microseconds.

Disk (bytes, apparent file sizes, symlinks not followed): ``logs`` — the log directory
(the directory of `log_file`, else `<data_dir>/logs`); ``dependencies`` — the running
interpreter's site-packages (the design's "nodeModules"); ``total`` — the project root.
Directory walks are slow on big trees, so each result is cached for `cache_s` and the
walk runs in a thread.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
import sysconfig
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from agentstream.schemas.health import DiskUsage, MemoryUsage, SystemStats


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (n, ctypes.c_size_t)
        for n in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


def _load_mallinfo2() -> Callable[[], _MallInfo2] | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        fn = libc.mallinfo2
    except (OSError, AttributeError):
        return None
    fn.restype = _MallInfo2
    fn.argtypes = []
    return fn


_MALLINFO2 = _load_mallinfo2()


def memory_usage(process: psutil.Process | None = None) -> MemoryUsage:
    proc = process or psutil.Process()
    mi = proc.memory_info()
    rss = int(mi.rss)
    shared = int(getattr(mi, "shared", 0))
    if _MALLINFO2 is not None:
        m = _MALLINFO2()
        used = int(m.uordblks + m.hblkhd)
        total = int(m.arena + m.hblkhd)
    else:
        used = sys.getallocatedblocks() * 64
        total = max(used, int(getattr(mi, "data", 0)))
    return MemoryUsage(rss=rss, heap_used=used, heap_total=max(total, used), external=shared)


def dir_size(path: Path) -> int:
    """Apparent size of every regular file under `path` (0 if missing)."""
    total = 0
    stack = [str(path)]
    while stack:
        top = stack.pop()
        try:
            with os.scandir(top) as it:
                for entry in it:
                    try:
                        if entry.is_dir(follow_symlinks=False):
                            stack.append(entry.path)
                        elif entry.is_file(follow_symlinks=False):
                            total += entry.stat(follow_symlinks=False).st_size
                    except OSError:
                        continue  # vanished while walking (rotated log, temp file)
        except OSError:
            continue
    return total


def dependencies_dir() -> Path:
    return Path(sysconfig.get_paths()["purelib"])


@dataclass
class _Cached:
    value: int
    at: float


class SystemMonitor:
    def __init__(
        self,
        *,
        worker_id: str,
        logs_dir: Path,
        project_root: Path,
        dependencies: Path | None = None,
        cache_s: float = 300.0,
        clock: Callable[[], float] = time.time,
        sizer: Callable[[Path], int] = dir_size,
    ) -> None:
        self.worker_id = worker_id
        self.paths = {
            "logs": logs_dir,
            "dependencies": dependencies or dependencies_dir(),
            "total": project_root,
        }
        self.cache_s = cache_s
        self.clock = clock
        self.sizer = sizer
        self._cache: dict[str, _Cached] = {}
        self._process = psutil.Process()
        self._process.cpu_percent(None)  # first call primes the counter
        self.latest: SystemStats | None = None

    def disk_size(self, name: str) -> int:
        """Cached size of one of the watched directories (logs are cheap: shorter cache)."""
        now = self.clock()
        ttl = self.cache_s if name != "logs" else min(self.cache_s, 30.0)
        hit = self._cache.get(name)
        if hit is not None and now - hit.at < ttl:
            return hit.value
        value = self.sizer(self.paths[name])
        self._cache[name] = _Cached(value, now)
        return value

    def sample(self) -> SystemStats:
        """One reading (may walk directories: call it in a thread from async code)."""
        disk = DiskUsage(**{name: self.disk_size(name) for name in self.paths})
        stats = SystemStats(
            worker_id=self.worker_id,
            timestamp=self.clock(),
            disk_usage=disk,
            memory=memory_usage(self._process),
            cpu_percent=float(self._process.cpu_percent(None)),
        )
        self.latest = stats
        return stats

    def describe(self) -> dict[str, Any]:
        return {name: str(p) for name, p in self.paths.items()}
