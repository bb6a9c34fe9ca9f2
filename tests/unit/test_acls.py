"""The role -> ACL model (`streams.acls`) and `agentstream acls`: each role gets what it
needs and nothing it must not have; the names follow the settings."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest
from click.testing import CliRunner

from agentstream.streams.acls import (
    CLUSTER,
    MUTATING,
    POLICY_CLI_TRANSACTIONAL_PREFIX,
    ROLES,
    VALID_OPERATIONS,
    WORKER_READS,
    WORKER_WRITES,
    AclError,
    AclScope,
    Binding,
    RoleAcls,
    check_principal,
    command,
    render,
    role_acls,
)
from agentstream.streams.eos import transactional_id_for
from agentstream.streams.topics import (
    AGENT_MESSAGES,
    AGENT_MESSAGES_REJECTED,
    CATALOGUE,
    SECURITY_DECISIONS,
    SECURITY_POLICIES,
    SIGNED_TOPICS,
)

SCOPE = AclScope(topic_prefix="staging.", app_id="pipe")


def acls(role: str, scope: AclScope = SCOPE) -> RoleAcls:
    return role_acls(role, f"User:{role}", scope)  # type: ignore[arg-type]


def topic_ops(role: RoleAcls, topic: str) -> set[str]:
    """Every operation `role` may do on the (full) topic name, Describe implied included."""
    return {op for op in VALID_OPERATIONS["topic"] if role.allows("topic", topic, op)}


# -- producer ------------------------------------------------------------------------------
def test_producer_never_writes_a_rule_topic_or_an_output() -> None:
    producer = acls("producer")
    for name in (*SIGNED_TOPICS, "security.changes.rejected", *WORKER_WRITES):
        full = SCOPE.topic(name)
        assert not topic_ops(producer, full) & MUTATING, name
    assert not producer.allows("topic", SCOPE.topic(SECURITY_POLICIES), "Write")


def test_producer_writes_exactly_the_agent_inputs() -> None:
    producer = acls("producer")
    written = {
        b.name for b in producer.bindings if b.resource == "topic" and b.operation == "Write"
    }
    assert written == {
        SCOPE.topic(n)
        for n in (
            "agent.messages",
            "agent.heartbeats",
            "metrics.samples",
            "comms.records",
            "llm.requests",
            "llm.cancellations",
        )
    }
    assert all(n in CATALOGUE for n in ("llm.requests", "llm.cancellations"))
    assert producer.allows("cluster", CLUSTER, "IdempotentWrite")  # streams.client is idempotent


def test_producer_reads_its_results_but_not_other_senders_denied_messages() -> None:
    producer = acls("producer")
    for name in ("agent.messages.accepted", "llm.chunks", "llm.responses"):
        assert producer.allows("topic", SCOPE.topic(name), "Read"), name
    for name in (AGENT_MESSAGES_REJECTED, SECURITY_DECISIONS, SECURITY_POLICIES):
        assert not producer.allows("topic", SCOPE.topic(name), "Read"), name
    assert not any(b.resource in ("group", "transactional-id") for b in producer.bindings)


# -- auditor -------------------------------------------------------------------------------
def test_auditor_changes_nothing() -> None:
    auditor = acls("auditor")
    assert {b.operation for b in auditor.bindings} == {"Read"}
    assert not {b.operation for b in auditor.bindings} & MUTATING
    assert not any(b.resource in ("cluster", "transactional-id") for b in auditor.bindings)


def test_auditor_reads_every_catalogue_topic_and_the_changelogs() -> None:
    auditor = acls("auditor")
    for name in CATALOGUE:
        assert auditor.allows("topic", SCOPE.topic(name), "Read"), name
        assert auditor.allows("topic", SCOPE.topic(name), "Describe"), name
    assert auditor.allows("topic", "pipe-security_decision_counts-changelog", "Read")
    # the CLI's readers join no group: none is granted unless asked for
    assert not any(b.resource == "group" for b in auditor.bindings)


# -- operator ------------------------------------------------------------------------------
def test_operator_writes_the_rule_topics_only() -> None:
    operator = acls("operator")
    written = {
        b.name for b in operator.bindings if b.operation == "Write" and b.resource == "topic"
    }
    assert written == set(SCOPE.topics(SIGNED_TOPICS))
    assert set(SIGNED_TOPICS) == {
        "security.policies",
        "security.identities",
        "security.worker_keys",
    }
    for name in SIGNED_TOPICS:
        assert operator.allows("topic", SCOPE.topic(name), "Read")  # policy list, folds
    assert operator.allows("topic", SCOPE.topic("security.changes.rejected"), "Read")
    assert not operator.allows("topic", SCOPE.topic(AGENT_MESSAGES), "Read")
    assert not operator.allows("topic", SCOPE.topic(AGENT_MESSAGES), "Create")


def test_operator_sees_every_catalogue_topic() -> None:
    # `policy apply` runs ensure_topics, which creates what it cannot see
    operator = acls("operator")
    for name in CATALOGUE:
        assert operator.allows("topic", SCOPE.topic(name), "Describe"), name


def test_operator_transactions_are_the_policy_clis() -> None:
    from agentstream.agents.security.cli import SOURCE

    operator = acls("operator")
    tid = f"{SOURCE}-0123456789abcdef"
    assert f"{SOURCE}-" == POLICY_CLI_TRANSACTIONAL_PREFIX
    assert operator.allows("transactional-id", tid, "Write")
    assert not operator.allows("transactional-id", transactional_id_for("pipe", 0, 1), "Write")


# -- worker --------------------------------------------------------------------------------
def test_worker_covers_every_catalogue_topic() -> None:
    worker = acls("worker")
    for name in CATALOGUE:
        full = SCOPE.topic(name)
        # Describe: ensure_topics must see it exists; Create: or make it
        assert worker.allows("topic", full, "Describe"), name
        assert worker.allows("topic", full, "Create"), name
        assert worker.allows("topic", full, "Read") or worker.allows("topic", full, "Write")
    assert set(WORKER_READS) | set(WORKER_WRITES) == set(CATALOGUE)


def test_worker_never_writes_its_inputs_or_the_rule_topics() -> None:
    worker = acls("worker")
    for name in ("agent.messages", "agent.heartbeats", "llm.requests", *SIGNED_TOPICS):
        assert not worker.allows("topic", SCOPE.topic(name), "Write"), name
    assert not any(b.operation in ("Delete", "Alter", "AlterConfigs") for b in worker.bindings)


def test_worker_faust_internals_follow_the_app_id() -> None:
    worker = acls("worker")
    assert worker.allows("group", "pipe", "Read")
    assert not worker.allows("group", "pipe2", "Read")
    for topic in ("pipe-accepted_by_sender-changelog", "pipe-__assignor-__leader"):
        assert {"Read", "Write", "Create"} <= topic_ops(worker, topic), topic
    assert worker.allows("transactional-id", transactional_id_for("pipe", 2, 7), "Write")
    assert not worker.allows("transactional-id", transactional_id_for("other", 0, 0), "Write")
    assert worker.allows("cluster", CLUSTER, "IdempotentWrite")


def test_worker_reads_what_its_agents_subscribe_to_and_tables_are_under_the_app_id() -> None:
    """The model against the real app: every topic an agent consumes is readable, and every
    table changelog is in the worker's prefixed grant."""
    from agentstream.streams.app import app, settings

    app.discover()
    scope = AclScope(topic_prefix=settings.topic_prefix, app_id=settings.app_id)
    worker = acls("worker", scope)
    subscribed = {t for agent in app.agents.values() for t in agent.channel.topics}
    assert subscribed, "no agents discovered"
    for topic in subscribed:
        assert worker.allows("topic", topic, "Read"), topic
    assert app.tables
    for table in app.tables.values():
        name = table.changelog_topic.get_topic_name()
        assert {"Read", "Write", "Create"} <= topic_ops(worker, name), name


def test_topics_precreated_drops_create_on_the_catalogue_only() -> None:
    scope = AclScope(topic_prefix="staging.", app_id="pipe", worker_creates_topics=False)
    worker = acls("worker", scope)
    assert not any(worker.allows("topic", scope.topic(n), "Create") for n in CATALOGUE)
    assert worker.allows("topic", "pipe-x-changelog", "Create")


# -- scope ---------------------------------------------------------------------------------
def test_prefix_and_app_id_flow_through() -> None:
    for role in ROLES:
        for b in acls(role).bindings:
            if b.resource == "topic" and b.pattern == "literal":
                assert b.name.startswith("staging."), b
                assert b.name.removeprefix("staging.") in CATALOGUE, b
            if b.pattern == "prefixed" and b.resource != "group":
                assert b.name in ("pipe-", POLICY_CLI_TRANSACTIONAL_PREFIX), b
    plain = acls("worker", AclScope())
    assert plain.allows("topic", "agent.messages", "Read")
    assert plain.allows("group", "agentstream", "Read")


def test_every_binding_is_valid_kafka() -> None:
    for role in ROLES:
        for b in acls(role).bindings:
            assert b.operation in VALID_OPERATIONS[b.resource], b
            assert b.name != "" and b.name != "*", b
            assert b.resource != "cluster" or b.name == CLUSTER


def test_scope_refuses_names_that_overlap() -> None:
    with pytest.raises(AclError, match="catalogue topics start with"):
        AclScope(topic_prefix="pipe-", app_id="pipe")
    with pytest.raises(AclError, match="worker's group"):
        AclScope(app_id="pipe", reader_group_prefix="pi")
    with pytest.raises(AclError, match="worker's group"):
        AclScope(app_id="pipe", reader_group_prefix="")
    ok = AclScope(app_id="pipe", reader_group_prefix="readers-")
    for role in ("producer", "auditor"):
        assert acls(role, ok).allows("group", "readers-dashboard", "Read")
    assert not acls("producer", ok).allows("group", "pipe", "Read")
    assert not acls("operator", ok).allows("group", "readers-x", "Read")


@pytest.mark.parametrize("bad", ["worker", "User:", ":worker", "User: w", "User:w\nrm", ""])
def test_principal_must_be_type_colon_name(bad: str) -> None:
    with pytest.raises(AclError):
        check_principal(bad)
    assert check_principal("User:CN=w1,OU=pipe") == "User:CN=w1,OU=pipe"


def test_binding_prefix_matching() -> None:
    b = Binding("topic", "pipe-", "prefixed", "Write")
    assert b.covers("topic", "pipe-x", "Write") and b.covers("topic", "pipe-x", "Describe")
    assert not b.covers("topic", "pipex", "Write") and not b.covers("group", "pipe-x", "Write")
    lit = Binding("topic", "a", "literal", "Read")
    assert lit.covers("topic", "a", "Describe") and not lit.covers("topic", "ab", "Read")
    assert not lit.covers("topic", "a", "Write")


# -- rendering -----------------------------------------------------------------------------
def test_command_is_kafka_acls_syntax() -> None:
    worker = acls("worker")
    by_resource = {g.resource + g.pattern: g for g in worker.grants}
    argv = command(
        "User:CN=w 1",
        by_resource["transactional-idprefixed"],
        bootstrap_server="b:9093",
        command_config="/etc/admin.properties",
    )
    assert argv == [
        "kafka-acls.sh",
        "--bootstrap-server",
        "b:9093",
        "--command-config",
        "/etc/admin.properties",
        "--add",
        "--allow-principal",
        "User:CN=w 1",
        "--operation",
        "Write",
        "--resource-pattern-type",
        "prefixed",
        "--transactional-id",
        "pipe-",
    ]
    cluster = command("User:w", by_resource["clusterliteral"], bootstrap_server="b:1")
    assert cluster[-3:] == ["--operation", "IdempotentWrite", "--cluster"]
    assert "--command-config" not in cluster and "--resource-pattern-type" not in cluster


def test_render_round_trips_through_a_shell_parse() -> None:
    roles = [role_acls("auditor", "User:CN=a b,O=x", SCOPE), acls("worker")]
    lines = render(roles, SCOPE, bootstrap_server="b:9093", executable="kafka-acls")
    commands = [shlex.split(line) for line in lines if not line.startswith("#")]
    assert len(commands) == sum(len(r.grants) for r in roles)
    assert all(c[0] == "kafka-acls" for c in commands)
    assert commands[0][commands[0].index("--allow-principal") + 1] == "User:CN=a b,O=x"
    # every binding is in some command: read the bindings back from the argv
    back: set[Binding] = set()
    for argv in commands:
        principal = argv[argv.index("--allow-principal") + 1]
        ops = [argv[i + 1] for i, a in enumerate(argv) if a == "--operation"]
        pattern = "prefixed" if "--resource-pattern-type" in argv else "literal"
        for i, a in enumerate(argv):
            flag = {
                "--topic": "topic",
                "--group": "group",
                "--transactional-id": "transactional-id",
            }
            if a in flag:
                back |= {Binding(flag[a], argv[i + 1], pattern, op) for op in ops}  # type: ignore[arg-type]
            if a == "--cluster":
                back |= {Binding("cluster", CLUSTER, "literal", op) for op in ops}
        del principal
    assert back == {b for r in roles for b in r.bindings}
    assert sum(line.startswith("# role ") for line in lines) == 2


# -- the command ---------------------------------------------------------------------------
def _cli(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    from agentstream.streams.cli import acls as _  # noqa: F401 - registers the command
    from agentstream.streams.cli import cli
    from agentstream.streams.settings import get_settings

    get_settings.cache_clear()
    try:
        result = CliRunner().invoke(cli, ["acls", *args], env=env or {})
    finally:
        get_settings.cache_clear()
    return result.exit_code, result.stdout, result.stderr


def test_cli_prints_all_roles_by_default(tmp_path: Path) -> None:
    code, out, err = _cli(env={"AGENTSTREAM_KAFKA_BOOTSTRAP": "k1:9093"})
    assert code == 0, err
    for role in ROLES:
        assert f"# role {role} (User:{role})" in out
    commands = [line for line in out.splitlines() if line and not line.startswith("#")]
    assert all(c.startswith("kafka-acls.sh --bootstrap-server k1:9093 --add ") for c in commands)


def test_cli_prints_only_the_roles_given_with_the_settings_names() -> None:
    code, out, err = _cli(
        "--producer",
        "User:agent-7",
        "--command-config",
        "/etc/admin.properties",
        "--bootstrap-server",
        "b:9",
        env={"AGENTSTREAM_TOPIC_PREFIX": "prod.", "AGENTSTREAM_APP_ID": "app9"},
    )
    assert code == 0, err
    assert "# role producer (User:agent-7)" in out and "# role worker" not in out
    assert "--topic prod.agent.messages " in out and "--command-config /etc/admin.properties" in out
    assert "security.policies" not in out
    code, out, err = _cli("--worker", "User:w", env={"AGENTSTREAM_APP_ID": "app9"})
    assert "--group app9" in out and "--transactional-id app9-" in out


@pytest.mark.parametrize(
    ("args", "env", "says"),
    [
        (["--worker", "worker"], {}, "not a Kafka principal"),
        (["--auditor", "User:a", "--reader-groups", "agent"], {}, "worker's group"),
        (["--worker", "User:w"], {"AGENTSTREAM_TOPIC_PREFIX": "agentstream-"}, "keeps them apart"),
    ],
)
def test_cli_mistakes_are_one_line(args: list[str], env: dict[str, str], says: str) -> None:
    code, out, err = _cli(*args, env=env)
    assert code == 2
    assert out == ""
    assert says in err and len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err


def test_worker_may_read_the_configs_of_the_topics_it_checks_at_start_and_no_others() -> None:
    """The worker refuses to start when a monitoring input keeps the producer's clock;
    without DescribeConfigs on those topics the check saw nothing under ACLs."""
    from agentstream.streams.acls import WORKER_CLOCK_CHECKS
    from agentstream.streams.admin import monitoring_clock_topics

    assert monitoring_clock_topics() == WORKER_CLOCK_CHECKS
    acls = role_acls("worker", "User:worker", SCOPE)
    described = {name for g in acls.grants if "DescribeConfigs" in g.operations for name in g.names}
    assert described == {SCOPE.topic(n) for n in WORKER_CLOCK_CHECKS}
    for name in WORKER_CLOCK_CHECKS:
        assert acls.allows("topic", SCOPE.topic(name), "DescribeConfigs")
    assert not acls.allows("topic", SCOPE.topic("agent.messages"), "DescribeConfigs")
