"""The peers stage's own virtualenv: Quix Streams and confluent-kafka live there, never in
the project's environment.

Quix Streams caps its dependencies (3.28: pydantic <2.14, confluent-kafka <2.13), so
installing it beside the project would pin the project itself to an older pydantic. The
peer runners therefore run with the python of a separate virtualenv that holds

* the project's runtime dependencies (``[project].dependencies`` of pyproject.toml) and
  the peers (``PEERS``),
* at the versions of ``constraints.txt``, except where ``bench/peers-constraints.txt``
  pins a package differently: that small file lists only what the peers add or force
  (``python -m bench.peers_venv --lock`` rewrites it).

The project itself is not installed there: the runners import ``agentstream`` and
``bench`` from the checkout through ``PYTHONPATH`` (as every bench subprocess does), so
they always run the checkout's schemas, and one virtualenv serves every checkout with the
same constraints.

It is built once into ``$XDG_CACHE_HOME/agentstream/bench-peers-venv`` (or
``BENCH_PEERS_VENV``) and reused while its stamp (Python, requirements, merged
constraints) matches; a file lock lets concurrent runs wait for one build.

``python -m bench.peers_venv`` builds it (if needed) and prints its python.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import tomllib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from agentstream.infra.paths import cache_home

REPO = Path(__file__).resolve().parent.parent
PROJECT_CONSTRAINTS = REPO / "constraints.txt"
PEERS_CONSTRAINTS = REPO / "bench" / "peers-constraints.txt"

#: what the peer runners import besides the project's own dependencies
PEERS = ("quixstreams", "confluent-kafka")

STAMP_NAME = ".bench-peers-stamp"

#: pip downloads and installs ~60 wheels; generous for a loaded 2-core machine
PIP_TIMEOUT_S = 900.0


class PeersVenvError(RuntimeError):
    """The peers' virtualenv could not be built."""


def venv_dir() -> Path:
    explicit = os.environ.get("BENCH_PEERS_VENV", "").strip()
    return Path(explicit).expanduser() if explicit else cache_home() / "bench-peers-venv"


def venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def canonical(name: str) -> str:
    """PEP 503 normalised project name (``Typing_Extensions`` → ``typing-extensions``)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def _pins(text: str) -> dict[str, str]:
    """canonical name → the ``name==version`` line, for every pin of a constraints file."""
    out: dict[str, str] = {}
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if line:
            out[canonical(re.split(r"[=<>!~\[; ]", line, maxsplit=1)[0])] = line
    return out


def requirements(pyproject: Path = REPO / "pyproject.toml") -> list[str]:
    """The project's runtime dependencies, as pyproject.toml states them, and the peers."""
    project = tomllib.loads(pyproject.read_text())["project"]
    return [*project["dependencies"], *PEERS]


def merged_constraints(project: Path = PROJECT_CONSTRAINTS, peers: Path = PEERS_CONSTRAINTS) -> str:
    """constraints.txt with the peers file's pins replacing those of the same packages."""
    pins = _pins(project.read_text())
    pins.update(_pins(peers.read_text()))
    return "".join(f"{line}\n" for _name, line in sorted(pins.items()))


def stamp(constraints: str, reqs: list[str]) -> str:
    """What the virtualenv was built from: a different one means rebuild."""
    return json.dumps(
        {
            "python": sys.version,
            "base_python": os.path.realpath(getattr(sys, "_base_executable", sys.executable)),
            "requirements": reqs,
            "constraints_sha256": hashlib.sha256(constraints.encode()).hexdigest(),
        },
        sort_keys=True,
    )


def is_current(venv: Path, expected: str) -> bool:
    try:
        return (venv / STAMP_NAME).read_text() == expected and venv_python(venv).exists()
    except FileNotFoundError:
        return False


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _run(cmd: list[str], what: str, env: dict[str, str] | None = None) -> str:
    try:
        done = subprocess.run(
            cmd,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=PIP_TIMEOUT_S,
            env=env,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise PeersVenvError(f"{what}: no result within {PIP_TIMEOUT_S:.0f}s") from exc
    if done.returncode != 0:
        tail = "\n".join((done.stdout + done.stderr).splitlines()[-30:])
        raise PeersVenvError(f"{what} failed (exit {done.returncode}): {shlex.join(cmd)}\n{tail}")
    return done.stdout


def ensure(venv: Path | None = None, log: Callable[[str], None] | None = None) -> Path:
    """The python of an up-to-date peers virtualenv, built first if missing or stale.

    Raises `PeersVenvError` (with pip's output) when it cannot be built, e.g. offline.
    """
    venv = venv or venv_dir()
    reqs = requirements()
    constraints = merged_constraints()
    expected = stamp(constraints, reqs)
    if is_current(venv, expected):
        return venv_python(venv)
    with _locked(venv.with_name(venv.name + ".lock")):
        if is_current(venv, expected):
            return venv_python(venv)  # another process built it while we waited
        if log is not None:
            log(f"building the peers' virtualenv in {venv} (pip, about a minute)")
        shutil.rmtree(venv, ignore_errors=True)
        _run([sys.executable, "-m", "venv", str(venv)], "python -m venv")
        python = str(venv_python(venv))
        with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as fh:
            fh.write(constraints)
        try:
            _run(
                [python, "-m", "pip", "install", "--quiet", "-c", fh.name, *reqs],
                "pip install of the peers' virtualenv",
            )
        finally:
            os.unlink(fh.name)
        # the checkout's schemas must import under the peers' dependency versions
        _run(
            [python, "-c", "import quixstreams, confluent_kafka, bench.peers_common"],
            "importing the peers and the project's schemas in the peers' virtualenv",
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
        (venv / STAMP_NAME).write_text(expected)  # last: a partial build is never reused
    return venv_python(venv)


def lock() -> str:
    """Re-resolve the peers file: the project's runtime dependencies at constraints.txt's
    versions, then the newest peers pip can add to them; the file keeps only the pins that
    differ from constraints.txt. Returns the new text (also written to the file)."""
    with tempfile.TemporaryDirectory() as tmp:
        venv = Path(tmp) / "venv"
        _run([sys.executable, "-m", "venv", str(venv)], "python -m venv")
        python = str(venv_python(venv))
        deps = requirements()[: -len(PEERS)]
        pip = [python, "-m", "pip", "install", "--quiet"]
        _run([*pip, "-c", str(PROJECT_CONSTRAINTS), *deps], "pip install of the project's deps")
        # no constraints here: pip changes only what the peers require it to change
        _run([*pip, *PEERS], "pip install of the peers")
        frozen = _pins(_run([python, "-m", "pip", "freeze"], "pip freeze"))
        impl = _run(
            [
                python,
                "-c",
                "import platform as p; print(p.python_implementation(), "
                "p.python_version(), 'on', p.system(), p.machine())",
            ],
            "platform",
        ).strip()
    project = _pins(PROJECT_CONSTRAINTS.read_text())
    changed = [line for name, line in sorted(frozen.items()) if project.get(name) != line]
    header = [line for line in PEERS_CONSTRAINTS.read_text().splitlines() if line.startswith("# ")]
    text = "\n".join([*header, f"#: resolved with {impl}", *changed]) + "\n"
    PEERS_CONSTRAINTS.write_text(text)
    return text


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.peers_venv", description=__doc__)
    p.add_argument(
        "--lock", action="store_true", help=f"rewrite {PEERS_CONSTRAINTS.relative_to(REPO)}"
    )
    args = p.parse_args(argv)
    if args.lock:
        print(lock(), end="")
        return 0
    print(ensure(log=lambda msg: print(msg, file=sys.stderr, flush=True)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
