"""The worker's log file rotates by size and by age into N gzip files."""

from __future__ import annotations

import gzip
import logging
from pathlib import Path

from agentstream.streams.logging_setup import SizeAndAgeRotatingFileHandler, attach_file_handler
from agentstream.streams.settings import Settings


def _logger(handler: logging.Handler, name: str) -> logging.Logger:
    log = logging.getLogger(name)
    log.propagate = False
    log.handlers[:] = [handler]
    log.setLevel(logging.INFO)
    return log


def test_rotates_by_size_keeping_n_gzip_files(tmp_path: Path) -> None:
    path = tmp_path / "logs" / "w.log"
    h = SizeAndAgeRotatingFileHandler(path, max_bytes=2000, max_age_s=3600, backups=3)
    log = _logger(h, "rot.size")
    for i in range(400):
        log.info("line %04d %s", i, "x" * 40)
    h.close()
    rotated = sorted(p.name for p in path.parent.glob("w.log.*.gz"))
    assert rotated == ["w.log.1.gz", "w.log.2.gz", "w.log.3.gz"]
    assert path.stat().st_size <= 2000
    newest = gzip.decompress((path.parent / "w.log.1.gz").read_bytes()).decode()
    oldest = gzip.decompress((path.parent / "w.log.3.gz").read_bytes()).decode()
    current = path.read_text()
    # order: .3 older than .2 older than .1 older than the live file, and line 399 is live
    assert "line 0399" in current
    n = lambda text: int(text.strip().splitlines()[-1].split()[1])  # noqa: E731
    assert n(oldest) < n(newest) < n(current)


def test_rotates_by_age_and_age_survives_restart(tmp_path: Path) -> None:
    path = tmp_path / "w.log"
    now = [1000.0]
    h = SizeAndAgeRotatingFileHandler(
        path, max_bytes=10**9, max_age_s=60, backups=2, clock=lambda: now[0]
    )
    log = _logger(h, "rot.age")
    log.info("first")
    now[0] += 30
    log.info("second")
    h.close()
    assert not (tmp_path / "w.log.1.gz").exists()
    # a restart 40 s later: the file is now 70 s old, the next record rotates it
    now[0] += 40
    h2 = SizeAndAgeRotatingFileHandler(
        path, max_bytes=10**9, max_age_s=60, backups=2, clock=lambda: now[0]
    )
    log = _logger(h2, "rot.age")
    log.info("third")
    h2.close()
    old = gzip.decompress((tmp_path / "w.log.1.gz").read_bytes()).decode()
    assert "first" in old and "second" in old and "third" not in old
    assert "third" in path.read_text()


def test_zero_backups_truncates(tmp_path: Path) -> None:
    path = tmp_path / "w.log"
    h = SizeAndAgeRotatingFileHandler(path, max_bytes=500, max_age_s=0, backups=0)
    log = _logger(h, "rot.zero")
    for i in range(100):
        log.info("line %d %s", i, "y" * 30)
    h.close()
    assert path.stat().st_size <= 500
    assert list(tmp_path.glob("*.gz")) == []


def test_attach_from_settings_once(tmp_path: Path) -> None:
    s = Settings.from_env({}, log_file=tmp_path / "x" / "worker.log", log_level="INFO")
    target = logging.getLogger("attach.test")
    try:
        assert attach_file_handler(s, target)
        assert not attach_file_handler(s, target)
        target.propagate = False
        target.setLevel(logging.INFO)
        target.info("hello file")
        for handler in target.handlers:
            handler.flush()
        assert "hello file" in (tmp_path / "x" / "worker.log").read_text()
    finally:
        for handler in list(target.handlers):
            handler.close()
            target.removeHandler(handler)
    assert not attach_file_handler(Settings.from_env({}), target)
