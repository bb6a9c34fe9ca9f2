"""`agentstream demo`: the whole pipeline on a local broker with synthetic agents.

Starts the local broker unless a cluster is configured, creates the topics, runs a worker
as a subprocess, publishes admin-signed security policies and agent identities, then
drives traffic from simulated agents — messages (most signed by their sender, some denied,
some oversized, some undecodable, one agent claiming a role it was never granted),
heartbeats (a few agents fall silent and come back), metrics, communication records and
LLM requests to the offline `local` provider — while printing a live summary read back
from the result topics. The worker's web views need a token like any deployment's: the
demo puts a token index with one read token (its value in ``<state>/demo/web-token``;
``<state>`` is ``var/`` in a checkout) and a cluster token in its throwaway keychain.

The security side (keys, signed rule changes, signed messages) is the security agent's
(`agents/security/demo.py`, registered with `register_demo_security` when the agents'
commands load): `streams` does not import `agents`.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, Protocol

import click

from agentstream.infra.paths import state_home
from agentstream.schemas import (
    AgentMessage,
    CommunicationRecord,
    Event,
    Heartbeat,
    LLMRequest,
    MetricSample,
    utc_now,
)
from agentstream.schemas.comms import COMM_KINDS
from agentstream.schemas.llm import ChatMessage, LLMConfig, LLMContext
from agentstream.streams.admin import ensure_topics
from agentstream.streams.cli import cli, finite_number, finite_seconds, run
from agentstream.streams.client import AsyncClient
from agentstream.streams.credentials import KeychainCredentialsProvider
from agentstream.streams.settings import Settings, get_settings, url_host
from agentstream.streams.topics import (
    AGENT_HEARTBEATS,
    AGENT_MESSAGES,
    AGENT_MESSAGES_ACCEPTED,
    AGENT_MESSAGES_REJECTED,
    AGENT_STATUS,
    COMMS_RECORDS,
    LLM_CHUNKS,
    LLM_REQUESTS,
    LLM_RESPONSES,
    METRICS_SAMPLES,
    PIPELINE_DEADLETTER,
    SECURITY_DECISIONS,
)
from agentstream.streams.web_auth import create_token, rotate_cluster_token, web_scheme

WATCHED = {
    AGENT_MESSAGES_ACCEPTED: "accepted",
    AGENT_MESSAGES_REJECTED: "rejected",
    SECURITY_DECISIONS: "decisions",
    PIPELINE_DEADLETTER: "dead letters",
    AGENT_STATUS: "status changes",
    LLM_CHUNKS: "llm chunks",
    LLM_RESPONSES: "llm responses",
}


#: seconds the demo waits, after its last input, for the outputs to catch up
DRAIN_S = 30.0


def caught_up(sent: Counter[str], seen: Counter[str]) -> bool:
    """Whether every input sent has its outputs: a decision and a verdict per decodable
    message, a dead letter per undecodable one, a final response per LLM request."""
    return (
        seen["accepted"] + seen["rejected"] >= sent["messages"]
        and seen["decisions"] >= sent["messages"]
        and seen["dead letters"] >= sent["undecodable"]
        and seen["llm responses"] >= sent["llm requests"]
    )


class DemoSecurity(Protocol):
    """What the demo needs of the security agent."""

    #: settings the worker needs (keychain, trusted admin key)
    env: dict[str, str]

    async def publish_rules(self, client: AsyncClient) -> None:
        """Publish the signed policies, config and identities of the simulated agents."""

    def sign(self, message: AgentMessage) -> AgentMessage:
        """The message as its sender would publish it (signed when it holds a key)."""


DemoSecurityFactory = Callable[[Path, list[str]], Coroutine[Any, Any, DemoSecurity]]
_SECURITY: list[DemoSecurityFactory] = []


def register_demo_security(factory: DemoSecurityFactory) -> None:
    """Called by agents.security when its commands load."""
    _SECURITY[:] = [factory]


DEMO_ENV = {
    # short intervals so that agents visibly go down and come back within a minute
    "AGENTSTREAM_HEARTBEAT_INTERVAL_S": "1",
    "AGENTSTREAM_HEARTBEAT_TIMEOUT_S": "4",
    "AGENTSTREAM_HEARTBEAT_MAX_MISSED": "3",
    "AGENTSTREAM_SYSTEM_MONITORING_INTERVAL_S": "5",
    "AGENTSTREAM_METRICS_COLLECTION_INTERVAL_S": "5",
    "AGENTSTREAM_SECURITY_DEFAULT_ACTION": "allow",
}


@cli.command()
# checked before the broker and the worker start: 0, nan or inf failed only then, in a
# ZeroDivisionError, ValueError or IndexError traceback
@click.option(
    "--rate",
    type=click.FloatRange(min=0, min_open=True),
    callback=finite_number,
    default=40.0,
    show_default=True,
    help="Agent messages per second.",
)
@click.option(
    "--agents",
    "n_agents",
    type=click.IntRange(min=1),
    default=8,
    show_default=True,
    help="Simulated agents.",
)
@click.option(
    "--duration",
    type=click.FloatRange(min=0),
    callback=finite_seconds,
    default=45.0,
    show_default=True,
    help="Seconds to run; 0 = until Ctrl-C.",
)
@click.option("--keep-broker", is_flag=True, help="Leave a broker the demo started running.")
@click.option("--seed", default=7, show_default=True, help="Random seed of the traffic.")
def demo(rate: float, n_agents: int, duration: float, keep_broker: bool, seed: int) -> None:
    """Run the pipeline on a local broker with synthetic multi-agent traffic."""
    from agentstream.infra.kafka import launcher

    started_broker = None
    if get_settings().kafka_bootstrap is None and not launcher.external_bootstrap():
        cfg = launcher.BrokerConfig.from_env()
        if not launcher.status(cfg)["running"]:
            click.echo("starting the local Kafka broker (first run fetches its jars) ...")
            started_broker = cfg
        try:
            bootstrap = launcher.start(cfg)
        except launcher.BrokerStartError as exc:
            raise click.ClickException(str(exc)) from exc
        os.environ["AGENTSTREAM_KAFKA_BOOTSTRAP"] = bootstrap
        get_settings.cache_clear()
    settings = get_settings()
    click.echo(f"kafka at {settings.bootstrap}; creating topics ...")
    run(ensure_topics(settings, check_partitions=True))

    log_dir = state_home() / "demo"
    log_dir.mkdir(parents=True, exist_ok=True)
    worker_log = log_dir / "worker.log"
    if not _SECURITY:
        raise click.ClickException("the security agent's commands did not load")
    agents = [f"agent-{i}" for i in range(n_agents)]
    security = run(_SECURITY[0](log_dir, agents))
    env = {**os.environ, **{k: v for k, v in DEMO_ENV.items() if k not in os.environ}}
    env.update(security.env)
    env["AGENTSTREAM_KAFKA_BOOTSTRAP"] = settings.bootstrap
    token_file = run(_web_tokens(env, log_dir))
    with worker_log.open("ab") as log:
        worker = subprocess.Popen(
            [sys.executable, "-m", "agentstream", "worker", "--loglevel", "info"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    root = f"{web_scheme(settings)}://{url_host(settings.web_host)}:{settings.web_port}"
    click.echo(f"worker pid {worker.pid} (log {worker_log}); web views on {root}/")
    if token_file is not None:
        click.echo(
            f'  they need a token: curl -H "Authorization: Bearer $(cat {token_file})" '
            f"{root}/agents/status"
        )
    try:
        run(_drive(settings, worker, worker_log, rate, agents, duration, seed, security))
    except KeyboardInterrupt:
        click.echo("\ninterrupted")
    finally:
        if worker.poll() is None:
            os.killpg(worker.pid, signal.SIGTERM)
            try:
                worker.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(worker.pid, signal.SIGKILL)
        if started_broker is not None and not keep_broker:
            # the demo exported the broker's address as AGENTSTREAM_KAFKA_BOOTSTRAP, which
            # stop() would take for an external cluster and leave running
            launcher.stop(started_broker, use_external=False)
            click.echo("local broker stopped (use --keep-broker to keep it)")


async def _web_tokens(env: dict[str, str], directory: Path) -> Path | None:
    """What the demo's worker needs for its web views, in the demo's throwaway keychain:
    a token index with one read token (written to `directory`/web-token, mode 0600, for
    whoever wants to look: printing it would leave it in terminal scrollback and CI logs)
    and a cluster token. None when the views need no token (AGENTSTREAM_WEB_AUTH=off)."""
    settings = Settings.from_env(env)
    if settings.web_auth == "off":
        return None
    provider = KeychainCredentialsProvider(settings)
    value, _ = await create_token(provider, "read", "demo")
    await rotate_cluster_token(provider)
    path = directory / "web-token"
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(value + "\n")
    return path


async def _wait_ready(worker: subprocess.Popen[bytes], log: Path, limit_s: float = 120) -> None:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        text = await asyncio.to_thread(log.read_text, errors="replace")
        if worker.poll() is not None:
            tail = "\n".join(text.splitlines()[-30:])
            raise click.ClickException(f"worker exited with {worker.returncode}:\n{tail}")
        if "[^Worker]: Ready" in text:
            return
        await asyncio.sleep(0.25)
    raise click.ClickException(f"worker not ready after {limit_s}s (see {log})")


async def _drive(
    settings: Settings,
    worker: subprocess.Popen[bytes],
    log: Path,
    rate: float,
    agents: list[str],
    duration: float,
    seed: int,
    security: DemoSecurity,
) -> None:
    counts: Counter[str] = Counter()
    sent: Counter[str] = Counter()
    transitions: list[str] = []
    async with AsyncClient(settings, source="demo") as client:
        watcher = asyncio.create_task(_watch(client, counts, transitions))
        await _wait_ready(worker, log)
        await security.publish_rules(client)
        click.echo("worker ready; driving traffic (Ctrl-C to stop)\n")
        rng = random.Random(seed)
        silent: dict[str, float] = {}
        start = time.monotonic()
        tick = 0
        next_print = start + 2
        while duration <= 0 or time.monotonic() - start < duration:
            tick += 1
            now = time.monotonic()
            elapsed = now - start
            # a chosen agent falls silent for a while, then comes back
            if tick % max(1, int(rate * 8)) == 0 and agents:
                silent[rng.choice(agents)] = now + 8
            for agent_id, until in list(silent.items()):
                if until < now:
                    del silent[agent_id]
            if tick % max(1, int(rate / 2)) == 0:
                for agent_id in agents:
                    if agent_id not in silent:
                        await client.publish(
                            AGENT_HEARTBEATS,
                            Heartbeat(agent_id=agent_id, sent_at=utc_now(), sequence=tick),
                            wait=False,
                        )
                        sent["heartbeats"] += 1
            await _one_message(client, rng, agents, sent, security)
            if tick % 5 == 0:
                await client.publish(
                    METRICS_SAMPLES,
                    MetricSample(
                        series="agent_latency_ms",
                        timestamp=time.time(),
                        value=rng.uniform(5, 250),
                        labels={"agent": rng.choice(agents)},
                    ),
                    wait=False,
                )
                kind = rng.choice(COMM_KINDS)
                await client.publish(
                    COMMS_RECORDS,
                    CommunicationRecord(
                        record_id=uuid.uuid4().hex,
                        kind=kind,
                        agent_id=rng.choice(agents),
                        counterparty=rng.choice(agents),
                        recorded_at=utc_now(),
                        amount=round(rng.uniform(1, 100), 2),
                        unit={"token": "tok", "wallet": "usd", "blockchain": "gas"}.get(kind, ""),
                    ),
                    wait=False,
                )
                sent["metrics"] += 1
                sent["comms"] += 1
            if tick % 20 == 0:
                await client.publish(LLM_REQUESTS, _llm_request(rng, agents), wait=False)
                sent["llm requests"] += 1
            if now >= next_print:
                next_print = now + 2
                _print_summary(elapsed, sent, counts, transitions)
            await asyncio.sleep(max(0.0, start + tick / rate - time.monotonic()))
        # the last summary once the outputs have caught up with what was sent: a fixed
        # wait printed a worker that was a few seconds behind as having lost messages
        for _ in range(int(DRAIN_S / 0.2)):  # polled: the watcher task fills `counts`
            if caught_up(sent, counts):
                break
            await asyncio.sleep(0.2)
        _print_summary(time.monotonic() - start, sent, counts, transitions)
        if not caught_up(sent, counts):
            click.echo(f"         (outputs still arriving {DRAIN_S:g} s after the last input)")
        watcher.cancel()


async def _one_message(
    client: AsyncClient,
    rng: random.Random,
    agents: list[str],
    sent: Counter[str],
    security: DemoSecurity,
) -> None:
    roll = rng.random()
    sender, recipient = rng.sample(agents, 2) if len(agents) > 1 else (agents[0], agents[0])
    if roll < 0.03:
        await client.publish_raw(
            AGENT_MESSAGES, b'{"type": "agent.message", "oops', sender.encode()
        )
        sent["undecodable"] += 1
        return
    content = rng.choice(
        [
            "status update: task 42 done",
            "please review the plan",
            "here is the summary you asked for",
            "password: hunter2",
            "lookup result attached",
        ]
    )
    if roll > 0.97:
        content = "x" * 3000  # over the 2 KiB limit of the demo policy
    # confidential messages claim a role: planners are granted it, workers are not
    level, role = ("confidential", "planner") if roll > 0.8 else ("standard", "")
    msg = AgentMessage(
        message_id=uuid.uuid4().hex,
        sender_id=sender,
        recipient_id=recipient,
        sender_role=role,
        security_level=level,
        content=content,
    )
    msg = security.sign(msg)
    await client.publish(AGENT_MESSAGES, Event.of(msg, source=sender), wait=False)
    sent["messages"] += 1


def _llm_request(rng: random.Random, agents: list[str]) -> LLMRequest:
    topic = rng.choice(["the weather", "a haiku about Kafka", "event sourcing", "circuit breakers"])
    return LLMRequest(
        request_id=uuid.uuid4().hex,
        agent_id=rng.choice(agents),
        provider="local",
        stream=True,
        context=LLMContext(messages=[ChatMessage(role="user", content=f"Tell me about {topic}.")]),
        config=LLMConfig(max_tokens=48, temperature=0.2),  # local-echo, a declared model
    )


async def _watch(client: AsyncClient, counts: Counter[str], transitions: list[str]) -> None:
    async for rec in client.subscribe(list(WATCHED), from_beginning=False):
        base = rec.topic[len(client.settings.topic_prefix) :]
        counts[WATCHED.get(base, base)] += 1
        ev = rec.event
        if ev is not None and ev.type == "agent.status_changed":
            p: Any = ev.payload
            transitions.append(f"{p.agent_id} {p.previous or 'new'}→{p.current}")


def _print_summary(
    elapsed: float, sent: Counter[str], counts: Counter[str], transitions: list[str]
) -> None:
    out = ", ".join(f"{k} {v}" for k, v in sorted(sent.items()))
    got = ", ".join(f"{name} {counts[name]}" for name in WATCHED.values())
    click.echo(f"[{elapsed:5.1f}s] sent: {out}")
    click.echo(f"         seen: {got}")
    if transitions:
        click.echo(f"         agent status: {'; '.join(transitions[-6:])}")
