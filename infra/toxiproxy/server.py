"""Build, start and stop a local Toxiproxy server (network faults through a real proxy).

Toxiproxy (github.com/Shopify/toxiproxy) is a TCP proxy with an HTTP API for
injecting faults ("toxics": latency, bandwidth limits, resets, timeouts) into live
connections.  There is no Debian package and prebuilt binaries cannot be fetched on
these machines, so :func:`install` builds the pinned version from the Go module proxy
with the machine's Go, once, into ``$XDG_CACHE_HOME/agentstream/toxiproxy/<version>/``
(default ``~/.cache/...``).  Only the standard library is used here, so that
``python -m agentstream.infra.toxiproxy install`` works before the project is installed.

:func:`start_server` runs the binary detached on a loopback port (pid and log file
in ``var/toxiproxy/``, one pair per API port) and returns once its API answers;
:func:`stop_server` stops it.  Drive it with :class:`infra.toxiproxy.client.Toxiproxy`.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from agentstream.infra.paths import cache_home, state_home
from agentstream.infra.procs import pid_alive

__all__ = [
    "DEFAULT_API_PORT",
    "MIN_GO_VERSION",
    "TOXIPROXY_MODULE",
    "TOXIPROXY_VERSION",
    "ServerConfig",
    "ToxiproxyError",
    "binary_path",
    "cache_dir",
    "install",
    "server_pid",
    "start_server",
    "stop_server",
]

#: Pinned release; its go.mod needs Go >= MIN_GO_VERSION.
TOXIPROXY_VERSION: Final = "v2.12.0"
MIN_GO_VERSION: Final = (1, 23)
TOXIPROXY_MODULE: Final = "github.com/Shopify/toxiproxy/v2/cmd/server"
DEFAULT_API_PORT: Final = 8474
DEFAULT_HOST: Final = "127.0.0.1"
_BINARY_NAME: Final = "toxiproxy-server"
_BUILD_TIMEOUT_S: Final = 900.0
DEFAULT_STATE_DIR: Final = state_home() / "toxiproxy"


class ToxiproxyError(RuntimeError):
    """Toxiproxy could not be built, started or driven; the message says why."""


def cache_dir(version: str = TOXIPROXY_VERSION) -> Path:
    """``$XDG_CACHE_HOME/agentstream/toxiproxy/<version>`` (default ``~/.cache/...``)."""
    return cache_home() / "toxiproxy" / version


def binary_path(version: str = TOXIPROXY_VERSION) -> Path:
    """Where :func:`install` puts the server binary (it may not exist yet)."""
    return cache_dir(version) / _BINARY_NAME


def _find_go() -> str | None:
    found = shutil.which("go")
    if found:
        return found
    for candidate in (
        Path(os.environ.get("GOROOT", "/nonexistent")) / "bin" / "go",
        Path("/usr/local/go/bin/go"),
        Path("/usr/lib/go/bin/go"),
    ):
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def _go_version(go: str) -> tuple[int, int] | None:
    try:
        done = subprocess.run(
            [go, "env", "GOVERSION"], capture_output=True, text=True, timeout=60, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    match = re.match(r"go(\d+)\.(\d+)", done.stdout.strip())
    return (int(match.group(1)), int(match.group(2))) if match else None


def install(version: str = TOXIPROXY_VERSION, *, force: bool = False) -> Path:
    """Build the Toxiproxy server once and return the binary's path.

    Cheap when cached (one ``stat``).  Otherwise ``go install <module>@<version>``
    with ``GOBIN`` pointing at a staging folder that is renamed into place only after
    a successful build; a file lock makes parallel calls safe.  Raises
    :class:`ToxiproxyError` with one clear line when Go is missing or too old
    (``GOTOOLCHAIN=local``: Go never downloads another toolchain behind our back).
    """
    binary = binary_path(version)
    if not force and binary.is_file() and os.access(binary, os.X_OK):
        return binary
    cache = cache_dir(version)
    cache.mkdir(parents=True, exist_ok=True)
    with _file_lock(cache / ".lock"):
        if not force and binary.is_file() and os.access(binary, os.X_OK):
            return binary
        go = _find_go()
        if go is None:
            raise ToxiproxyError(
                f"Go ('go') is not on PATH; Toxiproxy {version} is built from source with "
                f"Go >= {MIN_GO_VERSION[0]}.{MIN_GO_VERSION[1]}"
            )
        found = _go_version(go)
        if found is None or found < MIN_GO_VERSION:
            shown = "unknown" if found is None else f"{found[0]}.{found[1]}"
            raise ToxiproxyError(
                f"Toxiproxy {version} needs Go >= {MIN_GO_VERSION[0]}.{MIN_GO_VERSION[1]}, "
                f"but {go} is Go {shown}"
            )
        staging = cache / f"bin.tmp-{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        env = {
            **os.environ,
            "GOBIN": str(staging),
            "GOTOOLCHAIN": "local",
            "CGO_ENABLED": "0",
            "GOFLAGS": "-buildvcs=false",
        }
        # Stamp the version as upstream's release build does (else /version says "git").
        stamp = f"-X github.com/Shopify/toxiproxy/v2.Version={version.lstrip('v')}"
        cmd = [go, "install", "-ldflags", stamp, f"{TOXIPROXY_MODULE}@{version}"]
        try:
            done = subprocess.run(
                cmd,
                env=env,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=_BUILD_TIMEOUT_S,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            shutil.rmtree(staging, ignore_errors=True)
            raise ToxiproxyError(
                f"building Toxiproxy {version} took over {_BUILD_TIMEOUT_S:.0f}s"
            ) from exc
        built = staging / "server"
        if done.returncode != 0 or not built.is_file():
            shutil.rmtree(staging, ignore_errors=True)
            tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-20:])
            raise ToxiproxyError(
                f"building Toxiproxy {version} failed (exit {done.returncode}):\n{tail}"
            )
        built.replace(binary)
        shutil.rmtree(staging, ignore_errors=True)
    return binary


# --------------------------------------------------------------------------- server


@dataclass(frozen=True)
class ServerConfig:
    """One Toxiproxy server: API on ``host:port``, state files in ``state_dir``.

    Pid and log file names include the port, so servers on different ports (a
    developer's and a test's) never share them.  Tests should pass a ``state_dir``
    of their own (e.g. ``tmp_path``).
    """

    host: str = DEFAULT_HOST
    port: int = DEFAULT_API_PORT
    state_dir: Path = DEFAULT_STATE_DIR
    version: str = TOXIPROXY_VERSION
    start_timeout_s: float = 20.0

    def __post_init__(self) -> None:
        """Reject a port outside 1-65535."""
        if not 0 < self.port < 65536:
            raise ValueError(f"port={self.port} is out of the port range 1-65535")

    @property
    def api_url(self) -> str:
        """``http://host:port``: the base URL for :class:`~infra.toxiproxy.client.Toxiproxy`."""
        return f"http://{self.host}:{self.port}"

    @property
    def pid_file(self) -> Path:
        """``<state_dir>/toxiproxy-<port>.pid``."""
        return self.state_dir / f"toxiproxy-{self.port}.pid"

    @property
    def log_file(self) -> Path:
        """``<state_dir>/toxiproxy-<port>.log`` (the server's stdout and stderr)."""
        return self.state_dir / f"toxiproxy-{self.port}.log"


_CHILDREN: dict[int, subprocess.Popen[bytes]] = {}


def _alive(pid: int) -> bool:
    return pid_alive(
        pid,
        _CHILDREN,
        # pid reuse guard: still the server binary
        lambda cmdline: bool(cmdline) and cmdline[0].endswith(_BINARY_NAME.encode()),
    )


def server_pid(cfg: ServerConfig | None = None) -> int | None:
    """The pid of the server started for ``cfg``, or ``None`` when it is not running."""
    cfg = cfg or ServerConfig()
    try:
        pid = int(cfg.pid_file.read_text().strip())
    except (OSError, ValueError):
        return None
    return pid if pid > 0 and _alive(pid) else None


def _api_answers(cfg: ServerConfig, timeout: float = 1.0) -> bool:
    try:
        with urllib.request.urlopen(f"{cfg.api_url}/version", timeout=timeout) as resp:  # noqa: S310
            return int(resp.status) == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def start_server(cfg: ServerConfig | None = None) -> str:
    """Start Toxiproxy for ``cfg`` (building it first if needed); return the API URL.

    Idempotent: a server already running for this pid file is reused.  Returns once
    ``GET /version`` answers; raises :class:`ToxiproxyError` with the log tail when
    the server exits or does not answer within ``cfg.start_timeout_s``, or when
    something else already listens on the API port.
    """
    cfg = cfg or ServerConfig()
    cfg.state_dir.mkdir(parents=True, exist_ok=True)
    with _file_lock(cfg.pid_file.with_name(cfg.pid_file.name + ".lock")):
        if server_pid(cfg) is not None:
            if _wait_api(cfg, None):
                return cfg.api_url
            raise ToxiproxyError(f"Toxiproxy pid {server_pid(cfg)} runs but {cfg.api_url} is dead")
        cfg.pid_file.unlink(missing_ok=True)
        if _api_answers(cfg, timeout=0.5):
            raise ToxiproxyError(f"{cfg.api_url} already answers: another Toxiproxy owns it")
        binary = install(cfg.version)
        with cfg.log_file.open("ab") as log:
            proc = subprocess.Popen(
                [str(binary), "-host", cfg.host, "-port", str(cfg.port)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                close_fds=True,
            )
        _CHILDREN[proc.pid] = proc
        cfg.pid_file.write_text(f"{proc.pid}\n")
        if _wait_api(cfg, proc):
            return cfg.api_url
        code = proc.poll()
        _kill(proc.pid)
        cfg.pid_file.unlink(missing_ok=True)
        reason = f"exited with code {code}" if code is not None else "did not answer in time"
        raise ToxiproxyError(
            f"Toxiproxy on {cfg.api_url} {reason}; log {cfg.log_file}:\n{_tail(cfg.log_file)}"
        )


def _wait_api(cfg: ServerConfig, proc: subprocess.Popen[bytes] | None) -> bool:
    deadline = time.monotonic() + cfg.start_timeout_s
    while time.monotonic() < deadline:
        if _api_answers(cfg):
            return True
        if proc is not None and proc.poll() is not None:
            return False
        time.sleep(0.05)
    return False


def _kill(pid: int, timeout: float = 10.0) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, sig)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not _alive(pid):
                _CHILDREN.pop(pid, None)
                return
            time.sleep(0.05)


def stop_server(cfg: ServerConfig | None = None) -> bool:
    """Stop the server started for ``cfg``; True if one was running.  Its proxies
    (and their listening ports) disappear with it."""
    cfg = cfg or ServerConfig()
    if not cfg.state_dir.is_dir():
        return False
    with _file_lock(cfg.pid_file.with_name(cfg.pid_file.name + ".lock")):
        pid = server_pid(cfg)
        cfg.pid_file.unlink(missing_ok=True)
        if pid is None:
            return False
        _kill(pid)
        return True


def _tail(path: Path, lines: int = 20) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.strip().splitlines()[-lines:]) or "(log is empty)"


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
