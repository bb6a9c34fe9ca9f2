"""Least privilege on a cluster with an authorizer: which Kafka ACLs each role needs.

Four roles, each a principal of its own (``User:worker`` ...):

* **worker** — the Faust worker (`agentstream worker`): reads its input topics, the rule
  topics and its own chains' heads, writes its output topics, its consumer group (the app
  id), Faust's internal topics (table changelogs ``<app id>-<table>-changelog``, the leader
  topic ``<app id>-__assignor-__leader``) and exactly-once transactional ids
  (``<app id>-<topic group>-<partition>``), all under the prefix ``<app id>-``.
  `streams.admin.ensure_topics`, which `agentstream worker` runs first, creates missing
  catalogue topics: Create on each catalogue name (literal) unless the topics are created
  beforehand by an administrator (`AclScope.worker_creates_topics`).
* **producer** — an agent that publishes: writes the input topics agents publish to and
  reads the results addressed to agents (accepted messages, LLM chunks and responses).
  Never a rule topic, never a rejected message (other senders' denied content).
* **auditor** — read-only: every catalogue topic, and the table changelogs that
  `agentstream rebuild` compares with; no Write, Create, Alter or Delete anywhere.
* **operator** — the policy writer: the signed rule topics (`SIGNED_TOPICS`), what
  workers ignored there, its transactions (`agentstream policy apply` publishes a file in
  one), and Describe on the rest of the catalogue (`policy apply` / `identity grant` run
  `ensure_topics`, which must see that every topic exists, or it tries to create them).

Describe is not granted where Read or Write is: Kafka's authorizer implies Describe from
Read, Write, Delete and Alter. The CLI's readers (`replay`, `tail`, `audit verify`, policy
folds) join no consumer group (`streams.client.group_less_consumer`), so no role needs a
group for them; `AclScope.reader_group_prefix` grants one to producers and auditors whose
own code subscribes with a group id.

aiokafka 0.14's admin client has no ACL API: `render` writes Kafka's own ``kafka-acls``
commands (`kafka.admin.AclCommand`) for an operator to review and run.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

from agentstream.schemas.errors import PipelineError
from agentstream.streams.topics import (
    AGENT_HEARTBEATS,
    AGENT_MESSAGES,
    AGENT_MESSAGES_ACCEPTED,
    AGENT_MESSAGES_REJECTED,
    AGENT_STATUS,
    CATALOGUE,
    COMMS_RECORDS,
    LLM_BREAKER,
    LLM_CANCELLATIONS,
    LLM_CHUNKS,
    LLM_REQUESTS,
    LLM_RESPONSES,
    METRICS_SAMPLES,
    PIPELINE_CHECKPOINTS,
    PIPELINE_DEADLETTER,
    PIPELINE_HEALTH,
    SECURITY_CHANGES_REJECTED,
    SECURITY_DECISIONS,
    SECURITY_IDENTITIES,
    SECURITY_POLICIES,
    SECURITY_WORKER_KEYS,
    SIGNED_TOPICS,
    SYSTEM_STATS,
)

Role = Literal["worker", "producer", "auditor", "operator"]
ROLES: tuple[Role, ...] = ("worker", "producer", "auditor", "operator")
Resource = Literal["topic", "group", "transactional-id", "cluster"]
Pattern = Literal["literal", "prefixed"]

#: Kafka's name of the one cluster resource
CLUSTER = "kafka-cluster"
#: the operations Kafka accepts per resource type (`org.apache.kafka.common.acl.AclOperation`)
VALID_OPERATIONS: dict[str, frozenset[str]] = {
    "topic": frozenset(
        [
            "Read",
            "Write",
            "Create",
            "Delete",
            "Alter",
            "Describe",
            "DescribeConfigs",
            "AlterConfigs",
        ]
    ),
    "group": frozenset({"Read", "Describe", "Delete"}),
    "transactional-id": frozenset({"Describe", "Write"}),
    "cluster": frozenset(
        [
            "Create",
            "Alter",
            "Describe",
            "ClusterAction",
            "IdempotentWrite",
            "DescribeConfigs",
            "AlterConfigs",
        ]
    ),
}
#: what changes something, as opposed to Read/Describe
MUTATING = frozenset(
    {"Write", "Create", "Delete", "Alter", "AlterConfigs", "IdempotentWrite", "ClusterAction"}
)
_OPERATION_ORDER = (
    "Read",
    "Write",
    "Create",
    "Describe",
    "Alter",
    "Delete",
    "DescribeConfigs",
    "AlterConfigs",
    "IdempotentWrite",
    "ClusterAction",
)

#: Reads of the worker: the agents' inputs (Faust subscriptions, see `agents/*`), the rule
#: topics (`reject_unsigned_changes`, the policy store, `read_worker_keys`) and the heads of
#: the chains it extends (`streams.audit_chain`: security.decisions, llm.responses).
WORKER_READS = (
    AGENT_MESSAGES,
    AGENT_MESSAGES_ACCEPTED,
    SECURITY_POLICIES,
    SECURITY_IDENTITIES,
    SECURITY_WORKER_KEYS,
    SECURITY_DECISIONS,
    AGENT_HEARTBEATS,
    AGENT_STATUS,
    METRICS_SAMPLES,
    COMMS_RECORDS,
    LLM_REQUESTS,
    LLM_RESPONSES,
    LLM_CANCELLATIONS,
)
#: Topics whose configs the worker reads at start: the monitoring tables bound themselves
#: by these topics' append time, and a worker refuses to start on one that keeps the
#: producer's clock (`streams.admin.monitoring_clock_topics`, the same three).
WORKER_CLOCK_CHECKS = (AGENT_HEARTBEATS, METRICS_SAMPLES, COMMS_RECORDS)
#: Writes of the worker: everything its agents emit, dead letters and its own reports.
WORKER_WRITES = (
    AGENT_MESSAGES_ACCEPTED,
    AGENT_MESSAGES_REJECTED,
    SECURITY_DECISIONS,
    SECURITY_CHANGES_REJECTED,
    AGENT_STATUS,
    SYSTEM_STATS,
    LLM_CHUNKS,
    LLM_RESPONSES,
    LLM_BREAKER,
    PIPELINE_DEADLETTER,
    PIPELINE_CHECKPOINTS,
    PIPELINE_HEALTH,
)
#: What agents publish (`Client.publish`, `agentstream publish`, `agentstream llm ask`).
PRODUCER_WRITES = (
    AGENT_MESSAGES,
    AGENT_HEARTBEATS,
    METRICS_SAMPLES,
    COMMS_RECORDS,
    LLM_REQUESTS,
    LLM_CANCELLATIONS,
)
#: What agents read back: messages delivered to them, their LLM calls' chunks and
#: responses (`agentstream llm ask` follows both).
PRODUCER_READS = (AGENT_MESSAGES_ACCEPTED, LLM_CHUNKS, LLM_RESPONSES)
#: The operator reads and writes the signed rule topics (`policy`, `identity`,
#: `audit worker-key`) and reads why workers ignored a change there.
OPERATOR_WRITES = SIGNED_TOPICS
OPERATOR_READS = (*SIGNED_TOPICS, SECURITY_CHANGES_REJECTED)
#: `agents.security.cli.publish`: transactional id ``agentstream-policy-cli-<uuid>``
POLICY_CLI_TRANSACTIONAL_PREFIX = "agentstream-policy-cli-"

_PRINCIPAL = re.compile(r"[A-Za-z][A-Za-z0-9_]*:\S.*")


class AclError(PipelineError):
    """A principal or scope the ACLs cannot be written for."""


@dataclass(frozen=True, order=True)
class Binding:
    """One ACL: allow `operation` on the resource (`name` matched as `pattern`)."""

    resource: Resource
    name: str
    pattern: Pattern
    operation: str

    def covers(self, resource: str, name: str, operation: str) -> bool:
        """Whether this binding allows `operation` on that one resource, by Kafka's rules
        (a prefixed pattern matches every name that starts with it; Read, Write, Delete and
        Alter imply Describe)."""
        if resource != self.resource:
            return False
        if not (name == self.name if self.pattern == "literal" else name.startswith(self.name)):
            return False
        if operation == self.operation:
            return True
        return operation == "Describe" and self.operation in {"Read", "Write", "Delete", "Alter"}


@dataclass(frozen=True)
class Grant:
    """Some operations on some resources of one type and pattern: one ``kafka-acls``
    command, with the reason it exists."""

    resource: Resource
    names: tuple[str, ...]
    pattern: Pattern
    operations: tuple[str, ...]
    why: str

    def __post_init__(self) -> None:
        bad = set(self.operations) - VALID_OPERATIONS[self.resource]
        if bad or not self.operations or not self.names:
            raise ValueError(f"invalid grant on {self.resource}: {sorted(bad)} {self.names}")

    @property
    def bindings(self) -> tuple[Binding, ...]:
        return tuple(
            Binding(self.resource, name, self.pattern, op)
            for name in self.names
            for op in self.operations
        )


@dataclass(frozen=True)
class AclScope:
    """What the ACLs depend on besides the role: the settings' naming and two choices."""

    topic_prefix: str = ""
    app_id: str = "agentstream"
    #: the worker creates missing catalogue topics itself (`agentstream worker`); False
    #: when an administrator runs `agentstream topics create` before
    worker_creates_topics: bool = True
    #: consumer groups producers and auditors may use (prefix); None: none
    reader_group_prefix: str | None = None

    def __post_init__(self) -> None:
        if not self.app_id or any(c.isspace() for c in self.app_id):
            raise AclError(f"app id {self.app_id!r}: not a usable consumer group id")
        shadowed = [t for t in self.topics(CATALOGUE) if t.startswith(self.internal_prefix)]
        if shadowed:
            # the worker's prefixed grant on its internal topics would cover them (Write on
            # its own inputs and the rule topics), and so would the auditor's
            raise AclError(
                f"app id {self.app_id!r}: catalogue topics start with {self.internal_prefix!r} "
                f"too ({shadowed[0]} ...): pick an app id or topic prefix that keeps them apart"
            )
        prefix = self.reader_group_prefix
        if prefix is not None and self.app_id.startswith(prefix):
            # the worker's group would match: a reader could join it, take partitions and
            # commit offsets past messages no worker ever checked
            raise AclError(
                f"reader group prefix {prefix!r} also matches the worker's group "
                f"{self.app_id!r}: pick one the app id does not start with"
            )

    def topic(self, name: str) -> str:
        return f"{self.topic_prefix}{name}"

    def topics(self, names: Iterable[str]) -> tuple[str, ...]:
        return tuple(self.topic(n) for n in names)

    @property
    def internal_prefix(self) -> str:
        """Faust's internal topics and transactional ids start with this."""
        return f"{self.app_id}-"


@dataclass(frozen=True)
class RoleAcls:
    role: Role
    principal: str
    grants: tuple[Grant, ...]

    @property
    def bindings(self) -> tuple[Binding, ...]:
        return tuple(b for g in self.grants for b in g.bindings)

    def allows(self, resource: str, name: str, operation: str) -> bool:
        return any(b.covers(resource, name, operation) for b in self.bindings)


def check_principal(principal: str) -> str:
    """`principal` if it is Kafka's ``Type:name`` (``User:worker``, ``User:CN=w1,O=x``)."""
    if not _PRINCIPAL.fullmatch(principal):
        raise AclError(f"{principal!r} is not a Kafka principal: TYPE:NAME, e.g. User:worker")
    return principal


def _ordered(ops: Sequence[str]) -> tuple[str, ...]:
    return tuple(sorted(set(ops), key=_OPERATION_ORDER.index))


def _grant(
    resource: Resource,
    names: Sequence[str],
    ops: Sequence[str],
    why: str,
    *,
    prefixed: bool = False,
) -> Grant:
    return Grant(resource, tuple(names), "prefixed" if prefixed else "literal", _ordered(ops), why)


def _reader_group(scope: AclScope, who: str) -> list[Grant]:
    if scope.reader_group_prefix is None:
        return []
    return [
        _grant(
            "group",
            [scope.reader_group_prefix],
            ["Read"],
            f"consumer groups of {who} that subscribe with a group id",
            prefixed=True,
        )
    ]


def worker_grants(scope: AclScope) -> tuple[Grant, ...]:
    grants = [
        _grant("topic", scope.topics(WORKER_READS), ["Read"], "inputs, rule topics, chain heads"),
        _grant("topic", scope.topics(WORKER_WRITES), ["Write"], "outputs"),
        # read-only: without it the start's check of these topics' timestamp type was
        # skipped under ACLs, where a producer's clock there matters most
        _grant(
            "topic",
            scope.topics(WORKER_CLOCK_CHECKS),
            ["DescribeConfigs"],
            "the monitoring inputs' message.timestamp.type, checked at start "
            "(streams.admin.monitoring_clock_topics)",
        ),
    ]
    if scope.worker_creates_topics:
        grants.append(
            _grant(
                "topic",
                scope.topics(CATALOGUE),
                ["Create"],
                "agentstream worker creates missing catalogue topics (streams.admin)",
            )
        )
    grants += [
        _grant(
            "topic",
            [scope.internal_prefix],
            ["Read", "Write", "Create"],
            "Faust's table changelogs and leader topic",
            prefixed=True,
        ),
        _grant("group", [scope.app_id], ["Read"], "the worker's consumer group (the app id)"),
        _grant(
            "transactional-id",
            [scope.internal_prefix],
            ["Write"],
            "exactly-once transactions <app id>-<topic group>-<partition>",
            prefixed=True,
        ),
        _grant("cluster", [CLUSTER], ["IdempotentWrite"], "idempotent producer"),
    ]
    return tuple(grants)


def producer_grants(scope: AclScope) -> tuple[Grant, ...]:
    return (
        _grant("topic", scope.topics(PRODUCER_WRITES), ["Write"], "what agents publish"),
        _grant(
            "topic",
            scope.topics(PRODUCER_READS),
            ["Read"],
            "messages delivered to agents, LLM chunks and responses",
        ),
        _grant("cluster", [CLUSTER], ["IdempotentWrite"], "idempotent producer (streams.client)"),
        *_reader_group(scope, "agents"),
    )


def auditor_grants(scope: AclScope) -> tuple[Grant, ...]:
    return (
        _grant("topic", scope.topics(CATALOGUE), ["Read"], "every catalogue topic, read-only"),
        _grant(
            "topic",
            [scope.internal_prefix],
            ["Read"],
            "table changelogs (agentstream rebuild compares with them)",
            prefixed=True,
        ),
        *_reader_group(scope, "auditors"),
    )


def operator_grants(scope: AclScope) -> tuple[Grant, ...]:
    others = [n for n in CATALOGUE if n not in OPERATOR_READS]
    return (
        _grant(
            "topic",
            scope.topics(OPERATOR_WRITES),
            ["Read", "Write"],
            "the signed rule topics: policies and config, identities, worker keys",
        ),
        _grant(
            "topic",
            scope.topics([SECURITY_CHANGES_REJECTED]),
            ["Read"],
            "rule changes the workers ignored, with the reason",
        ),
        _grant(
            "topic",
            scope.topics(others),
            ["Describe"],
            "policy apply / identity grant check that every catalogue topic exists",
        ),
        _grant(
            "transactional-id",
            [POLICY_CLI_TRANSACTIONAL_PREFIX],
            ["Write"],
            "policy apply publishes a file in one transaction",
            prefixed=True,
        ),
        _grant("cluster", [CLUSTER], ["IdempotentWrite"], "idempotent producer (streams.client)"),
    )


_GRANTS = {
    "worker": worker_grants,
    "producer": producer_grants,
    "auditor": auditor_grants,
    "operator": operator_grants,
}


def role_acls(role: Role, principal: str, scope: AclScope) -> RoleAcls:
    if role not in _GRANTS:
        raise AclError(f"unknown role {role!r}: one of {', '.join(ROLES)}")
    return RoleAcls(role, check_principal(principal), _GRANTS[role](scope))


_SUMMARY = {
    "worker": "the Faust worker (agentstream worker)",
    "producer": "an agent that publishes to the pipeline",
    "auditor": "read-only: audit, replay, tail, rebuild",
    "operator": "the policy writer: signed rule changes",
}
_RESOURCE_FLAG = {
    "topic": "--topic",
    "group": "--group",
    "transactional-id": "--transactional-id",
}


def command(
    principal: str,
    grant: Grant,
    *,
    bootstrap_server: str,
    command_config: str | None = None,
    executable: str = "kafka-acls.sh",
) -> list[str]:
    """The ``kafka-acls`` argv that adds `grant` for `principal`."""
    argv = [executable, "--bootstrap-server", bootstrap_server]
    if command_config:
        argv += ["--command-config", command_config]
    argv += ["--add", "--allow-principal", principal]
    for op in grant.operations:
        argv += ["--operation", op]
    if grant.pattern == "prefixed":
        argv += ["--resource-pattern-type", "prefixed"]
    if grant.resource == "cluster":
        argv.append("--cluster")
    else:
        for name in grant.names:
            argv += [_RESOURCE_FLAG[grant.resource], name]
    return argv


def render(
    roles: Sequence[RoleAcls],
    scope: AclScope,
    *,
    bootstrap_server: str,
    command_config: str | None = None,
    executable: str = "kafka-acls.sh",
) -> list[str]:
    """Shell lines: a comment naming each role, then one command per grant (each after a
    comment saying why)."""
    lines = [
        f"# agentstream ACLs for topic prefix {scope.topic_prefix!r} and app id {scope.app_id!r}"
    ]
    for acls in roles:
        lines.append(f"# role {acls.role} ({acls.principal}): {_SUMMARY[acls.role]}")
        for grant in acls.grants:
            lines.append(f"#   {grant.why}")
            argv = command(
                acls.principal,
                grant,
                bootstrap_server=bootstrap_server,
                command_config=command_config,
                executable=executable,
            )
            lines.append(shlex.join(argv))
    return lines
