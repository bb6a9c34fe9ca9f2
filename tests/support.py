"""Helpers for integration tests: worker subprocesses, polling with deadlines, and
reading topics directly with aiokafka (once with read_topic, or followed for a whole test
with Follower)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import itertools
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar, overload

from aiokafka import AIOKafkaConsumer, TopicPartition

from agentstream.schemas import Event, encode, registry
from agentstream.schemas.errors import SchemaError
from agentstream.schemas.security import SignedChange
from agentstream.streams.settings import Settings

REPO = Path(__file__).resolve().parent.parent

#: where `restartable_port` hands ports out: below the kernel's ephemeral range (Linux's
#: default starts at 32768) and clear of the ports this project's brokers and proxies
#: use (chaos 18690+, test brokers 19092-20300, Toxiproxy 28474+, clusters 29092+)
RESTARTABLE_PORTS = range(23_000, 28_000)
#: slices of `RESTARTABLE_PORTS`: one per xdist worker (gw0..gw15) and one for a
#: process outside xdist (a serial run, the chaos runner)
_PORT_SLICES = 17
_port_cycle: Iterator[int] | None = None


def _ephemeral_start() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32_768


def port_free(port: int) -> bool:
    """Whether `port` can be bound on 127.0.0.1 now."""
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def restartable_port() -> int:
    """A free port for a worker's web server, which a test may stop and start again on
    the same port. Not from the ephemeral range, as ``bind(port 0)`` picks: there any
    outgoing connection of the machine (a Kafka client of another test) may take the
    port while the worker is down, and the restarted worker fails to bind it. Each
    xdist worker hands out its own slice of `RESTARTABLE_PORTS` in turn, skipping ports
    in use; where the ephemeral range reaches the slices, a port from bind(0)."""
    global _port_cycle
    if _ephemeral_start() <= RESTARTABLE_PORTS.stop:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return int(s.getsockname()[1])
    if _port_cycle is None:
        worker = os.environ.get("PYTEST_XDIST_WORKER", "")
        slot = int(worker[2:]) + 1 if worker[:2] == "gw" and worker[2:].isdigit() else 0
        span = len(RESTARTABLE_PORTS) // _PORT_SLICES
        first = RESTARTABLE_PORTS.start + (slot % _PORT_SLICES) * span
        _port_cycle = itertools.cycle(range(first, first + span))
    for _ in range(len(RESTARTABLE_PORTS) // _PORT_SLICES):
        port = next(_port_cycle)
        if port_free(port):
            return port
    raise RuntimeError("no free port in this process's slice of RESTARTABLE_PORTS")


T = TypeVar("T")
P = TypeVar("P")


def wait_until(pred: Callable[[], T], timeout: float, interval: float = 0.1, what: str = "") -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or pred}")
        time.sleep(interval)


@overload
async def await_until(
    pred: Callable[[], Awaitable[T]], timeout: float, interval: float = ..., what: str = ...
) -> T: ...
@overload
async def await_until(
    pred: Callable[[], T], timeout: float, interval: float = ..., what: str = ...
) -> T: ...
async def await_until(
    pred: Callable[[], Any], timeout: float, interval: float = 0.2, what: str = ""
) -> Any:
    """Poll `pred` until it returns something truthy, and return that. `pred` may be a
    coroutine function or a plain one: a plain one reads state that something else updates
    meanwhile (a Follower's task, a server thread), and unlike wait_until this keeps the
    event loop running between polls."""
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or pred}")
        await asyncio.sleep(interval)


def cli(
    env: dict[str, str], *args: str, input: str | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agentstream", *args],
        env=env,
        cwd=REPO,
        input=input,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


class AdminSigner:
    """A fresh Ed25519 admin key, for tests that publish signed rule changes themselves
    (the CLI signs with the one `with_admin_key` puts in the keychain)."""

    def __init__(self, key_id: str = "admin") -> None:
        from agentstream.streams.signing import new_private_key, public_b64

        self.key_id = key_id
        self.key = new_private_key()
        self.public = public_b64(self.key)

    @property
    def trusted(self) -> dict[str, Any]:
        return {self.key_id: self.key.public_key()}

    @property
    def setting(self) -> str:
        """The `AGENTSTREAM_SECURITY_ADMIN_KEYS` item that trusts this key."""
        return f"{self.key_id}={self.public}"

    def sign(self, payload: SignedChange) -> Any:
        from agentstream.streams.signing import sign_change

        body = sign_change(payload.TYPE, payload.model_dump(mode="json"), self.key, self.key_id)
        return type(payload).model_validate(body)

    def event(self, payload: SignedChange, source: str = "test") -> Event[Any]:
        return Event.of(self.sign(payload), source=source)

    def record(self, payload: SignedChange) -> tuple[bytes, bytes]:
        """(Kafka key, value) of the signed change, as the CLI publishes it."""
        event = self.event(payload)
        return event.key.encode(), encode(event)


def with_admin_key(
    env: dict[str, str], tmp_path: Path, signer: AdminSigner | None = None
) -> dict[str, str]:
    """`env` set up for signed rule changes: a keychain (an encrypted-file keyring in
    `tmp_path`, unless `env` names one already) holding a fresh admin key (or `signer`'s)
    under `admin_key.<id>` for the CLI, and `AGENTSTREAM_SECURITY_ADMIN_KEYS` /
    `AGENTSTREAM_SECURITY_ADMIN_KEY_ID` so that workers trust it."""
    from agentstream.streams.credentials import KeychainCredentialsProvider
    from agentstream.streams.signing import ADMIN_ENTRY, private_to_b64

    signer = signer or AdminSigner()
    out = with_keychain(env, tmp_path)
    existing = out.get("AGENTSTREAM_SECURITY_ADMIN_KEYS", "")
    out["AGENTSTREAM_SECURITY_ADMIN_KEYS"] = ",".join(x for x in (existing, signer.setting) if x)
    out["AGENTSTREAM_SECURITY_ADMIN_KEY_ID"] = signer.key_id
    settings = Settings.from_env(out)
    provider = KeychainCredentialsProvider(settings)
    assert provider.backend is not None, "with_admin_key needs the keychain secret source"
    provider.backend.set_password(
        settings.keyring_service, ADMIN_ENTRY.format(signer.key_id), private_to_b64(signer.key)
    )
    return out


@dataclass(frozen=True)
class WebTokens:
    """The web view tokens of one test's keychain (values: the test plays every client)."""

    read: str
    admin: str
    cluster: str

    def headers(self, scope: str = "read") -> dict[str, str]:
        return {"Authorization": f"Bearer {getattr(self, scope)}"}


#: keyring file -> the tokens `with_web_tokens` created in it
_WEB_TOKENS: dict[str, WebTokens] = {}


def with_keychain(env: dict[str, str], tmp_path: Path) -> dict[str, str]:
    """`env` with an encrypted-file keyring in `tmp_path` (unless it names one already)."""
    import secrets

    out = dict(env)
    if "AGENTSTREAM_KEYRING_BACKEND" not in out:
        out.update(
            {
                "AGENTSTREAM_KEYRING_BACKEND": "encrypted-file",
                "AGENTSTREAM_KEYRING_FILE": str(tmp_path / "keyring.json"),
                "AGENTSTREAM_KEYRING_PASSWORD": secrets.token_urlsafe(12),
            }
        )
    return out


def with_web_tokens(env: dict[str, str], tmp_path: Path) -> dict[str, str]:
    """`env` whose keychain holds a web token index with a read and an admin token, the
    admin one also as the CLI's `web.token`, and a cluster token — made the way
    `agentstream web token create` and `web cluster-token rotate` make them. The values
    are kept here for the tests' own HTTP clients (`web_tokens`, `web_client`)."""
    from agentstream.streams.credentials import KeychainCredentialsProvider
    from agentstream.streams.web_auth import CLI_ENTRY, create_token, rotate_cluster_token

    out = with_keychain(env, tmp_path)
    provider = KeychainCredentialsProvider(Settings.from_env(out))

    async def make() -> WebTokens:
        read, _ = await create_token(provider, "read", "tests-read")
        admin, _ = await create_token(provider, "admin", "tests-admin")
        await provider.set_secret(CLI_ENTRY, admin)
        return WebTokens(read=read, admin=admin, cluster=await rotate_cluster_token(provider))

    _WEB_TOKENS[out["AGENTSTREAM_KEYRING_FILE"]] = run_sync(make())
    return out


def run_sync(coro: Awaitable[T]) -> T:
    """Run a coroutine to the end from sync code, also when called from inside a test's
    event loop (then in a thread of its own: asyncio.run refuses a running loop)."""

    async def main() -> T:
        return await coro

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(main())
    import concurrent.futures

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, main()).result()


def web_tokens(env: dict[str, str]) -> WebTokens:
    """The tokens `with_web_tokens` (the `settings_env` fixture) made for `env`'s keychain."""
    return _WEB_TOKENS[env["AGENTSTREAM_KEYRING_FILE"]]


def web_url(env: dict[str, str]) -> str:
    return f"http://127.0.0.1:{env['AGENTSTREAM_WEB_PORT']}"


def web_client(env: dict[str, str], scope: str = "read", **kw: Any) -> Any:
    """An httpx.AsyncClient for the worker of `env`, sending the token of `scope`."""
    import httpx

    kw.setdefault("timeout", 10)
    kw.setdefault("base_url", web_url(env))
    return httpx.AsyncClient(headers=web_tokens(env).headers(scope), **kw)


def assert_rebuild_equal(env: dict[str, str], table: str) -> subprocess.CompletedProcess[str]:
    """`agentstream rebuild TABLE` finds the table rebuilt from its source topics equal to
    the live one (the command is agents.audit's: env's AGENTSTREAM_AGENTS must include it).
    Returns the run, for checks of its output."""
    out = cli(env, "rebuild", table)
    assert out.returncode == 0 and "equal to the live table: yes" in out.stdout, (
        out.stdout + out.stderr
    )
    return out


class Worker:
    """An `agentstream worker` subprocess, ready when Faust logs that it is."""

    def __init__(self, env: dict[str, str], log_path: Path, *extra: str) -> None:
        self.env = env
        self.log_path = log_path
        self.extra = extra
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 90) -> Worker:
        self._log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "agentstream", "worker", "--loglevel", "info", *self.extra],
            env=self.env,
            cwd=REPO,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        del offset
        wait_until(self._ready, timeout, 0.2, what=f"worker ready (log {self.log_path})")
        return self

    def _ready(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"worker exited with {self.proc.returncode}:\n{self.tail()}")
        return self.ready_count() > self._ready_seen

    _ready_seen = 0

    def ready_count(self) -> int:
        try:
            return self.log_path.read_text(errors="replace").count("[^Worker]: Ready")
        except FileNotFoundError:
            return 0

    def tail(self, n: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except FileNotFoundError:
            return ""

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def task_dump(self, timeout: float = 20) -> str:
        """What every asyncio task of the running worker waits for: SIGUSR2 makes it log
        each task's await chain (`streams.diagnostics`). For the diagnosis of a stall:
        the line each agent is suspended at. Empty when the worker is not running."""
        from agentstream.streams.diagnostics import MARK

        if not self.alive() or self.proc is None:
            return ""
        start = self.log_path.stat().st_size
        os.kill(self.proc.pid, signal.SIGUSR2)
        deadline = time.monotonic() + timeout
        text = ""
        while time.monotonic() < deadline:
            time.sleep(0.1)  # polling a file a subprocess writes: there is no event to await
            with self.log_path.open("rb") as f:
                f.seek(start)
                text = f.read().decode(errors="replace")
            if f"end of {MARK}" in text:
                break
        begin = text.find(MARK)
        return text[begin:] if begin >= 0 else text

    def kill(self) -> None:
        """kill -9, as a crash would."""
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(30)
        self._ready_seen = self.ready_count()

    #: a stop that ran out of time and became a kill -9: what the worker had not
    #: committed is processed again by the next one (exact counts no longer hold)
    stop_killed = False

    def stop(self, timeout: float = 30) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(30)
                self.stop_killed = True
                # shown with a failing test's output: a count off by a redelivery
                # afterwards comes from here, not from the pipeline
                print(f"worker {self.proc.pid} did not stop in {timeout:g} s: killed -9")
        self._ready_seen = self.ready_count()
        if hasattr(self, "_log"):
            self._log.close()


async def read_topic(
    bootstrap: str, topic: str, *, expect: int | None = None, timeout: float = 30, idle: float = 1.5
) -> list[tuple[Any, Event[Any] | None]]:
    """Read a topic from the beginning. With `expect`, poll until that many records arrived
    (or the deadline passes); otherwise until every partition is read up to where it ended
    when the read began, and then `idle` seconds pass without a new record (a first fetch
    slower than `idle` on a loaded broker returned nothing)."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, enable_auto_commit=False, isolation_level="read_committed"
    )
    await consumer.start()
    try:
        parts = None
        deadline = time.monotonic() + timeout
        while not parts:
            parts = consumer.partitions_for_topic(topic)
            if not parts:
                if time.monotonic() > deadline:
                    raise AssertionError(f"topic {topic} does not exist")
                await consumer._client.force_metadata_update()
                await asyncio.sleep(0.2)
        tps = [TopicPartition(topic, p) for p in sorted(parts)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        ends = await consumer.end_offsets(tps)  # the last stable offsets (read_committed)
        out: list[tuple[Any, Event[Any] | None]] = []
        last = time.monotonic()
        while time.monotonic() < deadline:
            batch = await consumer.getmany(timeout_ms=300)
            for records in batch.values():
                out += [(rec, _decode_or_none(rec.value)) for rec in records]
                if records:
                    last = time.monotonic()
            if expect is not None and len(out) >= expect:
                # a short grace period shows any surplus (duplicates) too
                await asyncio.sleep(0.5)
                for records in (await consumer.getmany(timeout_ms=300)).values():
                    out += [(r, _decode_or_none(r.value)) for r in records]
                return out
            if (
                expect is None
                and time.monotonic() - last > idle
                and all([await consumer.position(tp) >= ends[tp] for tp in tps])
            ):
                return out
        return out
    finally:
        await consumer.stop()


def _decode_or_none(value: bytes) -> Event[Any] | None:
    try:
        return registry.decode(value)
    except SchemaError:
        return None


async def cancel(task: asyncio.Task[Any] | None) -> None:
    """Cancel a test's background task and wait until it has ended: a task still pending
    when pytest-asyncio closes the test's loop is destroyed mid-await, with a warning and
    without its cleanup. An exception the task died of is raised here."""
    if task is not None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


class Follower:
    """Follows catalogue topics from the beginning with one consumer for the whole test,
    decoding every record in the background, so that a test can poll what has arrived so
    far (read_topic starts a consumer on every call: too slow to poll with).

    `events(name)` and `payloads(kind)` are what arrived, in order per partition;
    `undecodable` keeps the records that are not events, for a test that forbids them."""

    def __init__(self, settings: Settings, names: Iterable[str]) -> None:
        self.settings = settings
        self.seen: dict[str, list[Event[Any]]] = {name: [] for name in names}
        self.undecodable: list[Any] = []
        self._consumer: AIOKafkaConsumer | None = None
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Follower:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start(self, timeout: float = 30) -> Follower:
        """Returns once every topic exists (the worker creates them) and is assigned."""
        consumer = self._consumer = AIOKafkaConsumer(
            bootstrap_servers=self.settings.bootstrap, enable_auto_commit=False
        )
        await consumer.start()

        async def partitions(topic: str) -> set[int]:
            await consumer._client.force_metadata_update()
            return consumer.partitions_for_topic(topic) or set()

        tps = []
        for name in self.seen:
            topic = self.settings.topic(name)
            parts = await await_until(functools.partial(partitions, topic), timeout, what=topic)
            tps += [TopicPartition(topic, p) for p in sorted(parts)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        self._task = asyncio.create_task(self._poll(consumer))
        return self

    async def _poll(self, consumer: AIOKafkaConsumer) -> None:
        names = {self.settings.topic(name): name for name in self.seen}
        while True:
            for tp, records in (await consumer.getmany(timeout_ms=100)).items():
                events = self.seen[names[tp.topic]]
                for rec in records:
                    ev = _decode_or_none(rec.value)
                    if ev is None:
                        self.undecodable.append(rec)
                    else:
                        events.append(ev)

    async def stop(self) -> None:
        task, self._task = self._task, None
        try:
            await cancel(task)
        finally:
            if self._consumer is not None:
                await self._consumer.stop()
                self._consumer = None

    def events(self, name: str) -> list[Event[Any]]:
        return list(self.seen[name])

    def payloads(self, kind: type[P]) -> list[P]:
        """Payloads of one type from every followed topic."""
        return [
            ev.payload for evs in self.seen.values() for ev in evs if isinstance(ev.payload, kind)
        ]
