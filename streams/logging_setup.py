"""The pipeline's own log file, rotated by size AND age, keeping N gzip-compressed files.

Settings: `log_file` (unset: no file), `log_max_bytes`, `log_max_age_s`, `log_backups`.
Rotated files are ``<log_file>.1.gz`` (newest) … ``<log_file>.N.gz``; with `log_backups`
0 the file is simply truncated when it rotates.

The age of the current file is counted from when it was started: the handler keeps that
time in a small sidecar file ``<log_file>.started`` so that restarting the worker does not
reset the clock (a file's ctime/mtime cannot tell when it was created).

The worker attaches the handler after Faust has configured logging (Faust's worker
replaces the root logger's handlers while it starts): `agents.system` does it in a worker
task (`attach_file_handler`). Equivalent, and independent of which agents a worker runs:
``loghandlers=[h for h in [file_handler(settings)] if h]`` in `streams.app.create_app`
(the handler opens its file lazily, so CLI processes never create it).
"""

from __future__ import annotations

import contextlib
import gzip
import logging
import logging.handlers
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from streams.settings import Settings

FORMAT = "[%(asctime)s] [%(process)d] [%(levelname)s] %(name)s: %(message)s"


class SizeAndAgeRotatingFileHandler(logging.handlers.RotatingFileHandler):
    def __init__(
        self,
        filename: str | os.PathLike[str],
        *,
        max_bytes: int,
        max_age_s: float,
        backups: int,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.max_age_s = max_age_s
        self.clock = clock
        # RotatingFileHandler does nothing when backupCount is 0: we truncate instead
        # delay: building the handler (e.g. in `create_app`) must not create the file in
        # processes that never log to it (CLI commands)
        super().__init__(
            filename, maxBytes=max_bytes, backupCount=backups, encoding="utf-8", delay=True
        )
        self.namer = lambda name: name + ".gz"
        self.rotator = _gzip_rotate
        self._started_path = Path(self.baseFilename + ".started")
        self.started_at: float | None = None

    def _open(self) -> Any:
        Path(self.baseFilename).parent.mkdir(parents=True, exist_ok=True)
        if self.started_at is None:
            self.started_at = self._read_started()
        return super()._open()

    def _read_started(self) -> float:
        try:
            return float(self._started_path.read_text().strip())
        except (OSError, ValueError):
            started = self.clock()
            self._write_started(started)
            return started

    def _write_started(self, at: float) -> None:
        with contextlib.suppress(OSError):  # logging must never take the worker down
            self._started_path.write_text(f"{at}\n")

    def shouldRollover(self, record: logging.LogRecord) -> int:
        if self.stream is None:
            self.stream = self._open()
        assert self.started_at is not None
        if self.max_age_s > 0 and self.clock() - self.started_at >= self.max_age_s:
            try:
                if os.path.getsize(self.baseFilename) > 0:
                    return 1
            except OSError:
                return 0
        return super().shouldRollover(record)

    def doRollover(self) -> None:
        if self.backupCount > 0:
            super().doRollover()
        else:
            if self.stream:
                self.stream.close()
                self.stream = None
            with open(self.baseFilename, "w", encoding="utf-8"):
                pass
            if not self.delay:
                self.stream = self._open()
        self.started_at = self.clock()
        self._write_started(self.started_at)


def _gzip_rotate(source: str, dest: str) -> None:
    with open(source, "rb") as src, gzip.open(dest, "wb") as dst:
        shutil.copyfileobj(src, dst)
    os.remove(source)


def logs_dir(settings: Settings) -> Path:
    """Where the pipeline's logs go: the directory of `log_file`, else `<data_dir>/logs`."""
    return settings.log_file.parent if settings.log_file else settings.data_dir / "logs"


def file_handler(settings: Settings) -> SizeAndAgeRotatingFileHandler | None:
    if settings.log_file is None:
        return None
    handler = SizeAndAgeRotatingFileHandler(
        settings.log_file,
        max_bytes=settings.log_max_bytes,
        max_age_s=settings.log_max_age_s,
        backups=settings.log_backups,
    )
    handler.setFormatter(logging.Formatter(FORMAT))
    return handler


def attach_file_handler(settings: Settings, logger: logging.Logger | None = None) -> bool:
    """Add the rotating file handler to the root logger once; True if it was added."""
    root = logger or logging.getLogger()
    if settings.log_file is None:
        return False
    target = str(Path(settings.log_file).resolve())
    for h in root.handlers:
        if isinstance(h, SizeAndAgeRotatingFileHandler) and h.baseFilename == target:
            return False
    handler = file_handler(settings)
    if handler is None:
        return False
    handler.setLevel(logging.getLevelName(settings.log_level.upper()))
    root.addHandler(handler)
    return True
