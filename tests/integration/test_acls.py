"""The ACLs `agentstream acls` prints are enough, and no more, on a secured broker.

`secured_kafka` runs the StandardAuthorizer with allow.everyone.if.no.acl.found=false:
a principal without an ACL can do nothing. The module applies exactly the printed
commands for the four roles (through Kafka's own AclCommand, as the admin), then:

* the worker, as User:worker over SASL_SSL with exactly-once, creates the catalogue
  topics and its changelogs, takes the operator's policy and processes what a producer
  publishes end to end (messages, an LLM call), while the auditor reads the results and
  replays them;
* a producer writes the agent input topics and nothing else: never security.policies or
  an output (TopicAuthorizationFailedError), never reads others' denied messages;
* the auditor reads every catalogue topic and writes none, joins no group, creates nothing.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import os
import shlex
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiokafka import TopicPartition
from aiokafka.admin import NewTopic
from aiokafka.errors import (
    GroupAuthorizationFailedError,
    TopicAuthorizationFailedError,
)

from agentstream.schemas import AgentMessage, Event
from agentstream.streams.acls import PRODUCER_READS, PRODUCER_WRITES
from agentstream.streams.client import AsyncClient, group_less_consumer
from agentstream.streams.errors import BrokerAuthError, PublishError
from agentstream.streams.kafka_security import new_admin, new_producer
from agentstream.streams.settings import Settings
from agentstream.streams.topics import CATALOGUE, SECURITY_POLICIES
from tests.conftest import _free_port
from tests.support import REPO, Worker, await_until, cli, with_admin_key

# one worker runs the whole module: `deployment` (module scope) takes ~30 s to set up
pytestmark = [pytest.mark.integration, pytest.mark.xdist_group("acls")]

ROLES = ("worker", "producer", "auditor", "operator")
POLICIES = {
    "enabled": True,
    "default_action": "allow",
    "policies": [{"policy_id": "no-forbidden", "level": "*", "blocked_patterns": ["forbidden"]}],
}


def acl_main_class(kafka: Any) -> str:
    """kafka-acls.sh's main class: in Kafka's core up to 3.x, in tools from 4.0."""
    major = int(str(getattr(kafka, "version", "") or "3").split(".")[0])
    return "kafka.admin.AclCommand" if major < 4 else "org.apache.kafka.tools.AclCommand"


def acl_commands(printed: str) -> list[list[str]]:
    """The `kafka-acls.sh` commands `agentstream acls` printed, each as its argv."""
    return [
        shlex.split(line)
        for line in printed.splitlines()
        if line.strip() and not line.startswith("#")
    ]


def apply_acl_commands(kafka: Any, commands: list[list[str]]) -> None:
    """Run `commands` with Kafka's own AclCommand (they name the admin's client config)."""
    main = acl_main_class(kafka)

    def apply(argv: list[str]) -> tuple[list[str], subprocess.CompletedProcess[str]]:
        assert argv[0] == "kafka-acls.sh", argv
        done = subprocess.run(
            kafka.java_class_command(main, *argv[1:]),
            capture_output=True,
            text=True,
            timeout=180,
        )
        return argv, done

    # each command is its own JVM (~1.5 s of start-up): three at a time, they are
    # independent bindings
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        for argv, done in pool.map(apply, commands):
            assert done.returncode == 0, f"{shlex.join(argv)}\n{done.stdout}\n{done.stderr}"


@dataclass
class Deployment:
    """One namespace on the secured broker, its ACLs applied; `env(user)` connects as
    that SCRAM user."""

    kafka: Any
    ns: str
    base: dict[str, str]
    secrets: Path
    printed: str

    def env(self, user: str, **extra: str) -> dict[str, str]:
        return {
            **self.base,
            "AGENTSTREAM_KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
            "AGENTSTREAM_KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
            "AGENTSTREAM_KAFKA_SASL_USERNAME": user,
            "AGENTSTREAM_SECRET_KAFKA_SASL_PASSWORD": self.kafka.password(user),
            "AGENTSTREAM_SECRETS_DIR": str(self.secrets / user),
            **extra,
        }

    def settings(self, user: str) -> Settings:
        return Settings.from_env(self.env(user))

    def topic(self, name: str) -> str:
        return f"{self.ns}.{name}"

    @property
    def app_id(self) -> str:
        return f"{self.ns}-app"


@pytest.fixture(scope="module")
def deployment(
    secured_kafka: Any, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Deployment]:
    ns = f"t{uuid.uuid4().hex[:10]}"
    tmp = tmp_path_factory.mktemp("acls")
    base = {k: v for k, v in os.environ.items() if not k.startswith("AGENTSTREAM_")}
    base.update(
        {
            "AGENTSTREAM_KAFKA_BOOTSTRAP": secured_kafka.sasl_ssl_bootstrap,
            "AGENTSTREAM_KAFKA_SSL_CAFILE": str(secured_kafka.ca_file),
            # the SASL password: subprocesses (worker, CLI) from their environment; this
            # process's clients, several users at once, from a secrets dir per user. The
            # admin key and the worker's chain key: a keyring.
            "AGENTSTREAM_SECRET_SOURCES": "env,keychain,dir",
            "AGENTSTREAM_TOPIC_PREFIX": f"{ns}.",
            "AGENTSTREAM_APP_ID": f"{ns}-app",
            "AGENTSTREAM_DATA_DIR": str(tmp / "worker"),
            "AGENTSTREAM_TOPIC_PARTITIONS": "2",
            "AGENTSTREAM_WEB_PORT": str(_free_port()),
            "AGENTSTREAM_LOG_LEVEL": "INFO",
            "AGENTSTREAM_STANDBY_REPLICAS": "0",
            "HOME": str(tmp / "home"),
            "PYTHONPATH": str(REPO),
        }
    )
    base = with_admin_key(base, tmp)
    admin_config = str(secured_kafka.admin_command_config())
    printed = cli(
        base,
        "acls",
        *(x for role in ROLES for x in (f"--{role}", f"User:{role}")),
        "--bootstrap-server",
        secured_kafka.sasl_ssl_bootstrap,
        "--command-config",
        admin_config,
    )
    assert printed.returncode == 0, printed.stderr
    commands = acl_commands(printed.stdout)
    assert len(commands) >= 10, printed.stdout
    apply_acl_commands(secured_kafka, commands)
    secrets_dir = tmp / "secrets"
    for user in ("admin", *ROLES):
        (secrets_dir / user).mkdir(parents=True, mode=0o700)
        (secrets_dir / user / "kafka.sasl_password").write_text(secured_kafka.password(user))
    dep = Deployment(secured_kafka, ns, base, secrets_dir, printed.stdout)
    # the first thing `agentstream worker` does, as the worker: create the catalogue topics
    created = cli(dep.env("worker"), "topics", "create")
    assert created.returncode == 0, created.stderr + created.stdout
    assert f"created {len(CATALOGUE)} topic(s)" in created.stdout, created.stdout
    yield dep
    asyncio.run(_delete_topics(dep))


async def _delete_topics(dep: Deployment, ns: str | None = None) -> None:
    admin = new_admin(dep.settings("admin"), "test cleanup")
    try:
        await admin.start()
        mine = [t for t in await admin.list_topics() if t.startswith(ns or dep.ns)]
        if mine:
            await admin.delete_topics(mine)
    except Exception as exc:  # cleanup must not turn a passing test red
        print(f"topic cleanup for {dep.ns} failed: {exc!r}")
    finally:
        await admin.close()


# -- helpers ---------------------------------------------------------------------------------
async def read_all(settings: Settings, topic: str, timeout: float = 30) -> list[Any]:
    """Every record of `topic` up to its end now; raises TopicAuthorizationFailedError
    when the principal may not read it."""
    consumer = group_less_consumer(settings, "acl-test", auto_offset_reset="earliest")
    await consumer.start()
    try:
        async with asyncio.timeout(timeout):
            # raises at once for a topic not even described to us (aiokafka's offset
            # lookups would retry it forever)
            parts = await consumer._client._wait_on_metadata(topic)
            tps = [TopicPartition(topic, p) for p in sorted(parts)]
            consumer.assign(tps)
            await consumer.seek_to_beginning(*tps)
            ends = await consumer.end_offsets(tps)
            out: list[Any] = []
            while [tp for tp in tps if await consumer.position(tp) < ends[tp]]:
                for records in (await consumer.getmany(timeout_ms=300)).values():
                    out += records
            return out
    finally:
        await consumer.stop()


async def read_refused(settings: Settings, topic: str) -> bool:
    """Whether reading `topic` (which holds records) is refused by the authorizer: no
    Describe (the metadata says so), or Describe without Read (the fetch says so)."""
    try:
        records = await read_all(settings, topic)
    except TopicAuthorizationFailedError:
        return True
    assert records, f"{topic} holds no record: its readability shows nothing"
    return False


async def write_refused(settings: Settings, names: Any) -> dict[str, bool]:
    """Per catalogue topic of `names`: whether one record to it is refused by the
    authorizer. A plain (not idempotent) producer: an idempotent one needs IdempotentWrite
    or some Write before it can start at all."""
    producer = new_producer(settings, "acl test", enable_idempotence=False, acks="all")
    await producer.start()
    out = {}
    try:
        for name in names:
            try:
                await asyncio.wait_for(
                    producer.send_and_wait(settings.topic(name), b"acl-probe", b"acl-probe"), 30
                )
                out[name] = False
            except TopicAuthorizationFailedError:
                out[name] = True
    finally:
        await producer.stop()
    return out


async def create_refused(settings: Settings, name: str) -> bool:
    admin = new_admin(settings, "acl test")
    await admin.start()
    try:
        resp = await admin.create_topics([NewTopic(name, 1, 1)])
        errors = getattr(resp, "topic_errors", None) or getattr(resp, "topic_error_codes", [])
        codes = [item[1] for item in errors]
        return codes == [TopicAuthorizationFailedError.errno]
    finally:
        await admin.close()


def _message(mid: str, content: str) -> Event[Any]:
    msg = AgentMessage(message_id=mid, sender_id="agent-1", recipient_id="agent-2", content=content)
    return Event.of(msg, source="acl-test")


def _ids(records: list[Any]) -> set[str]:
    out = set()
    for rec in records:
        payload = json.loads(rec.value).get("payload") or {}
        if "message_id" in payload:
            out.add(payload["message_id"])
    return out


def own_worker_acls(
    dep: Deployment, tmp_path: Path
) -> tuple[str, dict[str, str], subprocess.CompletedProcess[str]]:
    """A namespace of its own for one test (its own worker ACLs): the namespace, the
    worker's settings for it, and `agentstream acls --worker` as printed for it (not
    applied yet)."""
    ns = f"t{uuid.uuid4().hex[:10]}"
    own = {
        "AGENTSTREAM_TOPIC_PREFIX": f"{ns}.",
        "AGENTSTREAM_APP_ID": f"{ns}-app",
        "AGENTSTREAM_DATA_DIR": str(tmp_path / "worker"),
        "AGENTSTREAM_WEB_PORT": str(_free_port()),
    }
    printed = cli(
        dep.env("worker", **own),
        "acls",
        "--worker",
        "User:worker",
        "--bootstrap-server",
        dep.kafka.sasl_ssl_bootstrap,
        "--command-config",
        str(dep.kafka.admin_command_config()),
    )
    assert printed.returncode == 0, printed.stderr
    return ns, own, printed


# -- the tests -------------------------------------------------------------------------------
async def test_the_pipeline_runs_end_to_end_under_the_printed_acls(
    deployment: Deployment, tmp_path: Path
) -> None:
    dep = deployment
    auditor = dep.settings("auditor")
    # the operator publishes a policy (ensure_topics sees every topic, one transaction)
    policy_file = tmp_path / "policies.json"
    policy_file.write_text(json.dumps(POLICIES))
    applied = cli(dep.env("operator"), "policy", "apply", str(policy_file))
    assert applied.returncode == 0, applied.stderr + applied.stdout
    listed = cli(dep.env("operator"), "policy", "list", "--json")
    assert listed.returncode == 0 and "no-forbidden" in json.loads(listed.stdout), listed.stderr

    worker_env = dep.env(
        "worker",
        AGENTSTREAM_PROCESSING_GUARANTEE="exactly_once",
        AGENTSTREAM_CHECKPOINT_INTERVAL_S="2",
        AGENTSTREAM_SYSTEM_MONITORING_INTERVAL_S="1",
    )
    worker = Worker(worker_env, tmp_path / "worker.log").start(timeout=150)
    try:
        # a producer publishes: one message the policy allows, one it denies, an LLM call
        async with AsyncClient(dep.settings("producer"), source="acl-test") as client:
            await client.publish("agent.messages", _message("m-ok", "hello"))
            await client.publish("agent.messages", _message("m-bad", "a forbidden word"))
        asked = await asyncio.to_thread(
            cli,
            dep.env("producer"),
            "llm",
            "ask",
            "what is a stream?",
            "--provider",
            "local",
            "--timeout",
            "90",
            timeout=150,
        )
        assert asked.returncode == 0, asked.stderr + worker.tail()
        assert "[completed] local/" in asked.stderr, asked.stderr

        # the auditor sees the outcome
        async def outcome() -> bool:
            accepted = _ids(await read_all(auditor, dep.topic("agent.messages.accepted")))
            rejected = _ids(await read_all(auditor, dep.topic("agent.messages.rejected")))
            return "m-ok" in accepted and "m-bad" in rejected

        await await_until(outcome, 90, interval=1, what="m-ok accepted, m-bad rejected")
        assert len(await read_all(auditor, dep.topic("security.decisions"))) >= 2
        for name in ("llm.responses", "llm.chunks", "system.stats", "pipeline.checkpoints"):

            async def written(name: str = name) -> bool:
                return bool(await read_all(auditor, dep.topic(name)))

            await await_until(written, 60, interval=1, what=f"records on {name}")

        # the producer reads what was delivered; a CLI reader as the auditor replays it
        producer_client = AsyncClient(dep.settings("producer"))
        seen = [
            rec.event.payload.message_id
            async for rec in producer_client.subscribe(
                # the end, or 30 s of silence if reading it were stuck
                "agent.messages.accepted",
                from_beginning=True,
                until_end=True,
                timeout_s=30,
            )
            if rec.event is not None
        ]
        assert "m-ok" in seen and "m-bad" not in seen
        replayed = cli(dep.env("auditor"), "replay", "--topics", "agent.messages.accepted")
        assert replayed.returncode == 0 and "m-ok" in replayed.stdout, replayed.stderr

        # Faust made its changelogs and leader topic under the app id, as the worker
        admin = new_admin(dep.settings("admin"), "acl test")
        await admin.start()
        try:
            internal = [t for t in await admin.list_topics() if t.startswith(f"{dep.app_id}-")]
        finally:
            await admin.close()
        assert f"{dep.app_id}-__assignor-__leader" in internal, internal
        assert any(t.endswith("-changelog") for t in internal), internal
        assert worker.alive(), worker.tail()
    finally:
        worker.stop()
    log = (tmp_path / "worker.log").read_text(errors="replace")
    for refusal in ("authorizationfailed", "authorization_failed", "not authorized"):
        at = log.lower().find(refusal)
        assert at < 0, log[max(0, at - 2000) : at + 500]


async def seed(dep: Deployment, names: Any) -> None:
    """One record on each catalogue topic of `names`, as the admin: a read that is
    allowed then returns something, so an allowed read is told from a mere Describe."""
    async with AsyncClient(dep.settings("admin"), source="acl-test") as client:
        for name in names:
            await client.publish_raw(name, b"acl-seed", b"acl-seed")


async def test_a_producer_writes_agent_inputs_and_nothing_else(deployment: Deployment) -> None:
    dep = deployment
    producer = dep.settings("producer")
    await seed(dep, CATALOGUE)
    async with AsyncClient(producer, source="acl-test") as client:
        await client.publish("agent.messages", _message("p-1", "hello"))
        with pytest.raises(PublishError) as refused_write:
            await client.publish_raw(SECURITY_POLICIES, b"x", b"__config__")
        assert isinstance(refused_write.value.cause, TopicAuthorizationFailedError)
    refused = await write_refused(producer, CATALOGUE)
    assert refused == {name: name not in PRODUCER_WRITES for name in CATALOGUE}
    unreadable = {name: await read_refused(producer, dep.topic(name)) for name in CATALOGUE}
    assert unreadable == {name: name not in PRODUCER_READS for name in CATALOGUE}
    assert await create_refused(producer, dep.topic("producer-made"))


async def test_the_auditor_reads_every_topic_and_changes_nothing(deployment: Deployment) -> None:
    dep = deployment
    auditor = dep.settings("auditor")
    await seed(dep, CATALOGUE)
    unreadable = {name: await read_refused(auditor, dep.topic(name)) for name in CATALOGUE}
    assert unreadable == dict.fromkeys(CATALOGUE, False)
    assert await write_refused(auditor, CATALOGUE) == dict.fromkeys(CATALOGUE, True)
    # nor may it start an idempotent producer (no IdempotentWrite, no Write anywhere)
    with pytest.raises(
        BrokerAuthError, match=r"User:auditor is not authorized \(ClusterAuthorizationFailed"
    ):
        async with AsyncClient(auditor, source="acl-test"):
            pass
    assert await create_refused(auditor, dep.topic("auditor-made"))
    # the worker's consumer group is not the auditor's to join (and commit in)
    with pytest.raises(GroupAuthorizationFailedError):
        async with asyncio.timeout(60):
            async for _rec in AsyncClient(auditor).subscribe(
                "agent.messages", group_id=dep.app_id, from_beginning=True, timeout_s=10
            ):
                break


async def test_a_worker_not_allowed_to_read_one_of_its_topics_stops_at_once(
    deployment: Deployment, tmp_path: Path
) -> None:
    """Read implies Describe; without it (and without Write) the broker leaves the topic
    out of every topic listing, as if it did not exist. The worker's start took it for
    one still being created and waited 30 s for it to show, then failed naming every
    catalogue topic; the metadata wait before joining the group would have waited 30 s
    more for it and joined without it. An operator needs the missing grant named, now."""
    dep = deployment
    ns, own, printed = own_worker_acls(dep, tmp_path)
    denied = f"{ns}.comms.records"  # the worker only reads it: no Write implies Describe
    commands = acl_commands(printed.stdout)
    reads = [argv for argv in commands if "Read" in argv and denied in argv]
    assert len(reads) == 1, printed.stdout
    at = reads[0].index(denied)
    del reads[0][at - 1 : at + 1]  # its `--topic NAME`
    apply_acl_commands(dep.kafka, commands)
    try:
        made = cli(dep.env("admin", **own), "topics", "create")  # the topics exist
        assert made.returncode == 0, made.stderr

        started = time.monotonic()
        run = cli(dep.env("worker", **own), "worker", timeout=120)
        took = time.monotonic() - started
        assert run.returncode == 1, run.stdout + run.stderr
        assert "Traceback" not in run.stdout + run.stderr, run.stderr
        errors = [line for line in run.stderr.splitlines() if line.startswith("Error:")]
        assert len(errors) == 1, run.stderr
        assert "User:worker" in errors[0] and denied in errors[0], errors[0]
        assert f"{ns}.agent.messages," not in errors[0]  # only the one it may not read
        assert "docs/acls.md" in errors[0], errors[0]
        assert took < 20, f"{took:.1f} s before it said so"
    finally:
        await _delete_topics(dep, ns)


async def test_a_worker_under_the_printed_acls_refuses_a_monitoring_input_on_the_producers_clock(
    deployment: Deployment, tmp_path: Path
) -> None:
    """The monitoring tables bound themselves by their inputs' append time; a worker does
    not start while one keeps the producer's clock. Under the printed ACLs the worker
    could not read topic configs, so the check saw nothing and the worker ran on a
    sender's clock: the ACLs now let it read those three topics' configs."""
    from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

    dep = deployment
    ns, own, printed = own_worker_acls(dep, tmp_path)
    apply_acl_commands(dep.kafka, acl_commands(printed.stdout))
    try:
        made = cli(dep.env("admin", **own), "topics", "create")
        assert made.returncode == 0, made.stderr
        heartbeats = f"{ns}.agent.heartbeats"
        admin = new_admin(dep.settings("admin"), "acl test")
        await admin.start()
        try:
            await admin.alter_configs(
                [
                    ConfigResource(
                        ConfigResourceType.TOPIC,
                        heartbeats,
                        {"message.timestamp.type": "CreateTime"},
                    )
                ]
            )
        finally:
            await admin.close()

        try:
            run = cli(dep.env("worker", **own), "worker", timeout=90)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the worker started on {heartbeats} with the producer's clock")
        assert run.returncode == 2, run.stdout + run.stderr
        assert "Traceback" not in run.stdout + run.stderr, run.stderr
        errors = [line for line in run.stderr.splitlines() if line.startswith("Error:")]
        assert len(errors) == 1, run.stderr
        assert heartbeats in errors[0] and "LogAppendTime" in errors[0], errors[0]
    finally:
        await _delete_topics(dep, ns)
