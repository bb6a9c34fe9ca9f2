"""`agentstream acls`: the Kafka ACLs each role needs, as `kafka-acls` commands."""

from __future__ import annotations

import click

from agentstream.schemas.errors import PipelineError
from agentstream.streams.acls import ROLES, AclScope, RoleAcls, render, role_acls
from agentstream.streams.cli import cli


class AclUsageError(click.ClickException):
    """A mistake on the command line: one line on stderr, exit 2."""

    exit_code = 2


@cli.command("acls")
@click.option("--worker", metavar="PRINCIPAL", help="The Faust worker's principal.")
@click.option("--producer", metavar="PRINCIPAL", help="Principal of agents that publish.")
@click.option("--auditor", metavar="PRINCIPAL", help="Read-only principal (audit, replay).")
@click.option("--operator", metavar="PRINCIPAL", help="The policy writer's principal.")
@click.option(
    "--bootstrap-server",
    metavar="HOST:PORT",
    help="Where kafka-acls connects (default: the settings' bootstrap).",
)
@click.option(
    "--command-config",
    metavar="FILE",
    help="kafka-acls' client properties (security.protocol, sasl.jaas.config ...) of a "
    "principal allowed to alter ACLs.",
)
@click.option(
    "--topics-precreated",
    is_flag=True,
    help="An administrator creates the catalogue topics (`agentstream topics create`): "
    "the worker gets no Create on them.",
)
@click.option(
    "--reader-groups",
    metavar="PREFIX",
    help="Also let producers and auditors use consumer groups whose ids start with PREFIX "
    "(their own code subscribing with a group id; the CLI's readers use none).",
)
@click.option(
    "--kafka-acls",
    "executable",
    default="kafka-acls.sh",
    show_default=True,
    help="The command to print (`kafka-acls` on Confluent's packages).",
)
def acls_cmd(
    worker: str | None,
    producer: str | None,
    auditor: str | None,
    operator: str | None,
    bootstrap_server: str | None,
    command_config: str | None,
    topics_precreated: bool,
    reader_groups: str | None,
    executable: str,
) -> None:
    """Print the Kafka ACLs each role needs, least privilege, as kafka-acls commands.

    For a cluster with an authorizer (KRaft's StandardAuthorizer,
    allow.everyone.if.no.acl.found=false). Roles: worker (the Faust worker), producer (an
    agent that publishes), auditor (read-only), operator (signed rule changes). Only the
    roles given are printed; none given: all four, as User:worker, User:producer,
    User:auditor and User:operator. Topic names follow AGENTSTREAM_TOPIC_PREFIX, Faust's
    group, internal topics and transactional ids AGENTSTREAM_APP_ID.

    aiokafka's admin client has no ACL API, so this prints commands instead of applying
    them: review, then pipe them to a shell (`agentstream acls ... | sh`) as a principal
    allowed to alter ACLs (--command-config). Reference: docs/acls.md.
    """
    given = dict(zip(ROLES, (worker, producer, auditor, operator), strict=True))
    chosen = {r: p for r, p in given.items() if p is not None}
    if not chosen:
        chosen = {r: f"User:{r}" for r in ROLES}
    try:
        from agentstream.streams.settings import get_settings

        settings = get_settings()
        scope = AclScope(
            topic_prefix=settings.topic_prefix,
            app_id=settings.app_id,
            worker_creates_topics=not topics_precreated,
            reader_group_prefix=reader_groups,
        )
        roles: list[RoleAcls] = [role_acls(r, p, scope) for r, p in chosen.items()]
    except PipelineError as exc:
        raise AclUsageError(str(exc)) from None
    for line in render(
        roles,
        scope,
        bootstrap_server=bootstrap_server or settings.bootstrap,
        command_config=command_config,
        executable=executable,
    ):
        click.echo(line)
