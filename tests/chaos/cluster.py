"""Brokers and workers the chaos suite owns.

`OwnBroker`: a single-node broker started with the project's launcher
(`infra.kafka.launcher`) on the chaos port range (default 18690 upwards: clear of the test
broker's 19090-19300 and of 29092+), with its own data dir, so a scenario may kill -9 it
and restart it without touching anybody's broker. `ChaosWorker`: an `agentstream worker`
subprocess (`tests.support.Worker`) that starts without blocking the event loop and can be
kill -9'ed, SIGSTOP'ed and SIGCONT'ed."""

from __future__ import annotations

import asyncio
import calendar
import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import orjson

from tests.support import REPO, Worker, port_free

#: first port of the chaos range; AGENTSTREAM_CHAOS_PORT_BASE moves it
PORT_BASE = int(os.environ.get("AGENTSTREAM_CHAOS_PORT_BASE", "18690"))
PORT_SPAN = 200
_FORBIDDEN = (range(19090, 19301), range(29092, 65536))


def free_port_pair(base: int = PORT_BASE) -> tuple[int, int]:
    """Two free consecutive ports in the chaos range (for broker + controller)."""
    for port in range(base, base + PORT_SPAN, 2):
        if any(port in r or port + 1 in r for r in _FORBIDDEN):
            raise RuntimeError(f"chaos port range reaches a reserved port ({port})")
        if port_free(port) and port_free(port + 1):
            return port, port + 1
    raise RuntimeError(f"no free port pair in {base}..{base + PORT_SPAN}")


class OwnBroker:
    """A broker of the suite's own; `kill()` is kill -9, `restart()` starts it again on
    the same data dir (log recovery after the unclean stop)."""

    def __init__(self, state_dir: Path, port_base: int = PORT_BASE, heap: str = "") -> None:
        from agentstream.infra.kafka import launcher

        port, controller = free_port_pair(port_base)
        self.state_dir = state_dir
        self.cfg = launcher.BrokerConfig(
            data_dir=state_dir / "data",
            port=port,
            controller_port=controller,
            log_file=state_dir / "broker.log",
            pid_file=state_dir / "broker.pid",
            heap=heap or "-Xms256m -Xmx768m",
        )
        self.kills = 0
        #: the process the last kill ended
        self.killed_pid: int | None = None

    @property
    def bootstrap(self) -> str:
        return self.cfg.bootstrap

    def start(self) -> str:
        from agentstream.infra.kafka import launcher

        env_bootstrap = os.environ.pop(launcher.ENV_BOOTSTRAP, None)
        try:  # the launcher would return an external cluster instead of starting ours
            return launcher.start(self.cfg)
        finally:
            if env_bootstrap is not None:
                os.environ[launcher.ENV_BOOTSTRAP] = env_bootstrap

    def pid(self) -> int | None:
        from agentstream.infra.kafka import launcher

        return launcher._running_pid(self.cfg)

    def kill(self) -> None:
        """kill -9 the broker's process group."""
        pid = self.pid()
        if pid is None:
            raise RuntimeError("the chaos broker is not running")
        os.killpg(pid, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while self.pid() is not None and time.monotonic() < deadline:
            time.sleep(0.05)
        if self.pid() is not None:
            raise RuntimeError(f"the chaos broker (pid {pid}) outlived its kill -9 by 30 s")
        self.kills += 1
        self.killed_pid = pid

    def restart(self) -> str:
        """Start it again on its data: a new process (a start that found the old one
        still running would make the outage a pretence)."""
        bootstrap = self.start()
        if self.killed_pid is not None and self.pid() == self.killed_pid:
            raise RuntimeError("the chaos broker was not restarted: its old process runs")
        return bootstrap

    def cpu_seconds(self) -> float:
        pid = self.pid()
        return _proc_cpu(pid) if pid else 0.0

    def stop(self, wipe: bool = False) -> None:
        from agentstream.infra.kafka import launcher

        env_bootstrap = os.environ.pop(launcher.ENV_BOOTSTRAP, None)
        try:
            launcher.stop(self.cfg)
        finally:
            if env_bootstrap is not None:
                os.environ[launcher.ENV_BOOTSTRAP] = env_bootstrap
        if wipe:
            shutil.rmtree(self.state_dir / "data", ignore_errors=True)


_CRASHED = re.compile(r"Crashed reason=([^\n]*)")


def _proc_cpu(pid: int) -> float:
    """user + system CPU seconds of a live process (Linux /proc)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return 0.0
    return (int(stat[11]) + int(stat[12])) / os.sysconf("SC_CLK_TCK")


class ChaosWorker(Worker):
    """A worker the suite kills, stops and restarts; `expected_down` tells the supervisor
    not to restart it (a scenario is doing so)."""

    def __init__(self, name: str, env: dict[str, str], log_path: Path) -> None:
        super().__init__(env, log_path)
        self.name = name
        self.port = int(env["AGENTSTREAM_WEB_PORT"])
        self.expected_down = False
        #: a `ready()` is waiting for it (and relaunches it if it dies)
        self.waiting = False
        self.starts = 0
        self.kills = 0
        self.crashes: list[int] = []
        self.cpu_s = 0.0  # CPU of the processes that already ended
        self._stopped = False

    def launch(self) -> None:
        """Start the process; readiness is awaited separately (`ready`)."""
        if hasattr(self, "_log"):
            self._log.close()
        self._log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "agentstream", "worker", "--loglevel", "info"],
            env=self.env,
            cwd=REPO,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        # for `sweep`: a runner killed with -9 leaves its workers (own sessions) running
        self.log_path.with_suffix(".pid").write_text(f"{self.proc.pid}\n")
        self.starts += 1
        self._stopped = False

    async def ready(self, timeout: float = 120, strict: bool = False) -> None:
        """Until the worker logs Ready. A process that dies meanwhile (a crash while it
        recovers) is relaunched, as a supervisor would, unless `strict` (an error)."""
        deadline = time.monotonic() + timeout
        self.waiting = True
        try:
            while not (self.alive() and self.ready_count() > self._ready_seen):
                if not self.alive():
                    if strict:
                        raise AssertionError(f"{self.name} exited while starting:\n{self.tail()}")
                    assert self.proc is not None
                    self.crashes.append(self.proc.returncode)
                    self._ready_seen = self.ready_count()
                    await asyncio.sleep(1.0)
                    self.launch()
                    continue
                if time.monotonic() > deadline:
                    raise AssertionError(f"{self.name} not ready after {timeout}s:\n{self.tail()}")
                await asyncio.sleep(0.2)
        finally:
            self.waiting = False

    async def start_async(self, timeout: float = 120) -> ChaosWorker:
        self.launch()
        await self.ready(timeout, strict=True)
        return self

    def cpu_now(self) -> float:
        return self.cpu_s + (_proc_cpu(self.proc.pid) if self.alive() and self.proc else 0.0)

    def _account(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.cpu_s += _proc_cpu(self.proc.pid)

    def kill(self) -> None:
        self._account()
        self.kills += 1
        super().kill()
        if hasattr(self, "_log"):
            self._log.close()

    def crash_reasons(self) -> dict[str, int]:
        """Distinct crash reasons the worker logged (Faust's "Crashed reason=..." and
        uncaught tracebacks' last line), with counts."""
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return {}
        found: dict[str, int] = {}
        for m in _CRASHED.finditer(text):
            reason = re.sub(r"chaos[0-9a-f]{8}", "<ns>", m.group(1))
            reason = re.sub(r"\d+", "N", reason)[:160]
            found[reason] = found.get(reason, 0) + 1
        return found

    def suspend(self) -> None:
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGCONT)

    def stop(self, timeout: float = 30) -> None:
        self._account()
        self._stopped = True
        super().stop(timeout)

    def reap(self) -> int | None:
        """The exit code if the process ended on its own (a crash), once; else None."""
        if self.proc is None or self._stopped or self.expected_down or self.waiting:
            return None
        code = self.proc.poll()
        if code is None:
            return None
        self._stopped = True
        self._ready_seen = self.ready_count()
        self.crashes.append(code)
        return code


#: ports of the suite's proxied brokers and clusters (4 per node, then Toxiproxy's API):
#: above the single brokers' range, below the test broker's 19090
INFRA_PORT_BASE = PORT_BASE + PORT_SPAN + 10
INFRA_PORT_STOP = 19090


class OwnKafka:
    """A Kafka of the suite's own built with `infra.kafka.cluster` (`nodes` brokers on a
    free port block in 18900..19089), optionally behind Toxiproxy (`proxied`: every
    client connection, bootstrap and per-leader, crosses a proxy; replication does not).
    `bootstrap` is what the run's clients use (the proxies when proxied), `direct` the
    brokers' own listeners. `stop()` removes brokers, proxies and server, also after a
    failed start."""

    def __init__(self, state_dir: Path, nodes: int = 1, proxied: bool = False) -> None:
        from agentstream.infra.kafka import cluster as kc

        self.state_dir = state_dir = state_dir.resolve()  # the JVM runs elsewhere
        base = kc.free_port_block(
            kc.PORTS_PER_NODE * nodes + 1, start=INFRA_PORT_BASE, stop=INFRA_PORT_STOP
        )
        self.cfg = kc.ClusterConfig(
            nodes=nodes, base_port=base, root=state_dir / "cluster", proxied=proxied
        )
        self.api_port = base + kc.PORTS_PER_NODE * nodes  # Toxiproxy's API
        self.kafka: Any = None  # infra.toxiproxy.kafka.ProxiedKafka
        self._server: Any = None
        self.kills = 0

    @property
    def bootstrap(self) -> str:
        return str(self.cfg.bootstrap)

    @property
    def direct(self) -> str:
        return ",".join(f"{self.cfg.host}:{self.cfg.port(i)}" for i in self.cfg.node_ids)

    def worker_env(self) -> dict[str, str]:
        """What the workers need on this Kafka (RF 3 topics on a 3-node cluster)."""
        return {"AGENTSTREAM_TOPIC_REPLICATION": str(min(3, self.cfg.nodes))}

    def start(self) -> str:
        from agentstream.infra.kafka import cluster as kc

        if not self.cfg.proxied:
            return str(kc.start_cluster(self.cfg))
        from agentstream.infra.toxiproxy.client import Toxiproxy
        from agentstream.infra.toxiproxy.kafka import start_behind_proxy
        from agentstream.infra.toxiproxy.server import ServerConfig, start_server

        self._server = ServerConfig(port=self.api_port, state_dir=self.state_dir / "toxiproxy")
        tp = Toxiproxy(start_server(self._server))
        self.kafka = start_behind_proxy(tp, self.cfg)
        return self.bootstrap

    def proxies(self) -> list[Any]:
        if self.kafka is None:
            raise RuntimeError("this Kafka is not behind Toxiproxy")
        return list(self.kafka.proxies.values())

    def heal(self) -> None:
        if self.kafka is not None:
            self.kafka.heal()

    def accepted_clients(self, since: float, until: float) -> int:
        """Client connections the proxies accepted within [since, until] (wall seconds,
        whole seconds as Toxiproxy logs them): after a reset every client reconnects."""
        if self._server is None:
            return 0
        try:
            lines = self._server.log_file.read_bytes().splitlines()
        except FileNotFoundError:
            return 0
        n = 0
        lo, hi = int(since), int(until) + 1
        for line in lines:
            if b'"Accepted client"' not in line:
                continue
            with contextlib.suppress(ValueError, KeyError, TypeError):
                at = calendar.timegm(
                    time.strptime(orjson.loads(line)["time"], "%Y-%m-%dT%H:%M:%SZ")
                )
                n += lo <= at <= hi
        return n

    def cpu_seconds(self) -> float:
        from agentstream.infra.kafka import cluster as kc

        total = 0.0
        for i in self.cfg.node_ids:
            pid = kc.node_pid(self.cfg, i)
            total += _proc_cpu(pid) if pid else 0.0
        return total

    def stop(self, wipe: bool = False) -> None:
        from agentstream.infra.kafka import cluster as kc

        try:
            if self.kafka is not None:
                from agentstream.infra.toxiproxy.kafka import stop_behind_proxy

                stop_behind_proxy(self.kafka)
            else:
                kc.stop_cluster(self.cfg)
        finally:
            if self._server is not None:
                from agentstream.infra.toxiproxy.server import stop_server

                stop_server(self._server)
            if wipe:
                shutil.rmtree(self.cfg.root, ignore_errors=True)


#: what a pid file under a chaos run's directory may name: a worker, a Kafka JVM, Toxiproxy
_OURS = (b"agentstream\x00worker", b"kafka.Kafka", b"toxiproxy")


def sweep(root: Path) -> list[int]:
    """Kill (SIGTERM, then SIGKILL after 10 s) every process group named by a pid file
    under `root` that is still one of ours (its command line says worker, Kafka or
    Toxiproxy: a recycled pid is left alone): what a runner that was killed -9, or
    interrupted while a broker was being (re)started in a thread, left behind. Returns
    the pids it signalled."""
    pids = []
    for pid_file in root.rglob("*.pid") if root.is_dir() else ():
        try:
            pid = int(pid_file.read_text().split()[0])
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except (OSError, ValueError, IndexError):
            continue
        if any(mark in cmdline for mark in _OURS):
            pids.append(pid)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        alive = []
        for pid in pids:
            try:
                os.killpg(pid, sig)
                alive.append(pid)
            except ProcessLookupError:
                pass
            except PermissionError:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
                    alive.append(pid)
        deadline = time.monotonic() + 10
        while alive and time.monotonic() < deadline:
            alive = [p for p in alive if Path(f"/proc/{p}").exists() and not _zombie(p)]
            time.sleep(0.1)
        if not alive:
            break
    return pids


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] == "Z"
    except (OSError, IndexError):
        return True
