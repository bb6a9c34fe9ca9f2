"""`agentstream web token create|revoke|list` and `agentstream web cluster-token rotate`:
the tokens of the worker web views (see `streams.web_auth` and docs/security.md).

A token's value is printed once, by `create`, and never stored: the token index (secret
``web.tokens``) keeps its SHA-256 only. Workers re-read the index within
`web_auth.INDEX_TTL_S` seconds, so `create` and `revoke` need no restart.
"""

from __future__ import annotations

import json

import click

from agentstream.streams.cli import cli, json_option, run, without_agents
from agentstream.streams.credentials import KeychainCredentialsProvider
from agentstream.streams.errors import CredentialsError
from agentstream.streams.web_auth import (
    CLI_ENTRY,
    CLUSTER_ENTRY,
    INDEX_ENTRY,
    INDEX_TTL_S,
    SCOPES,
    TokenIndexError,
    create_token,
    listing,
    read_index,
    revoke_token,
    rotate_cluster_token,
)


def _provider() -> KeychainCredentialsProvider:
    try:
        return KeychainCredentialsProvider()
    except CredentialsError as exc:
        raise click.ClickException(f"{type(exc).__name__}: {exc}") from exc


def _index_error(exc: TokenIndexError) -> click.ClickException:
    # never rewrite an index that could not be read: a fix by hand keeps what it holds
    return click.ClickException(
        f"the token index (secret {INDEX_ENTRY}) is not valid: {exc}; nothing was changed"
    )


@without_agents
@cli.group()
def web() -> None:
    """The worker web views: access tokens."""


@web.group()
def token() -> None:
    """Tokens for the web views (scope read: GET; admin: everything)."""


@token.command("create")
@click.option("--scope", type=click.Choice(SCOPES), required=True, help="What it may do.")
@click.option("--name", required=True, help="Who or what holds it (e.g. grafana, alice).")
@click.option(
    "--for-cli",
    is_flag=True,
    help=f"Also store the value as this CLI's token (secret {CLI_ENTRY}), for the "
    "commands that call worker views.",
)
def token_create(scope: str, name: str, for_cli: bool) -> None:
    """Create a token; its value is printed once (only its hash is kept)."""
    provider = _provider()
    try:
        value, record = run(create_token(provider, scope, name))
    except TokenIndexError as exc:
        raise _index_error(exc) from exc
    except ValueError as exc:  # a bad name
        raise click.BadParameter(str(exc), param_hint="--name") from exc
    click.echo(value)
    click.echo(
        f"token {record.id} ({record.name}, scope {record.scope}): shown once, only its hash "
        f"is stored; workers accept it within {INDEX_TTL_S:g}s",
        err=True,
    )
    if for_cli:
        try:
            run(provider.update_secret(CLI_ENTRY, value))
        except click.ClickException as exc:
            # the token exists and its value was printed above: say which half failed
            raise click.ClickException(
                f"token {record.id} was created but not stored as this CLI's token: "
                f"{exc.format_message()}"
            ) from exc
        click.echo(f"stored as this CLI's token ({CLI_ENTRY})", err=True)


@token.command("revoke")
@click.argument("token_id")
def token_revoke(token_id: str) -> None:
    """Revoke a token by id: workers refuse it within a few seconds, no restart."""
    try:
        record = run(revoke_token(_provider(), token_id))
    except TokenIndexError as exc:
        raise _index_error(exc) from exc
    except KeyError:
        raise click.ClickException(
            f"no token with id {token_id!r} (see `web token list`)"
        ) from None
    click.echo(
        f"revoked token {record.id} ({record.name}, scope {record.scope}); workers refuse "
        f"it within {INDEX_TTL_S:g}s"
    )


@token.command("list")
@json_option(lines=True)
def token_list(as_json: bool) -> None:
    """Ids, names, scopes and creation times (never values)."""
    try:
        index = run(read_index(_provider()))
    except TokenIndexError as exc:
        raise click.ClickException(
            f"the token index (secret {INDEX_ENTRY}) is not valid: {exc}"
        ) from exc
    rows = list(listing(index))
    if as_json:
        for row in rows:
            click.echo(json.dumps(row))
        return
    if not rows:
        click.echo("no web tokens: create one with `agentstream web token create`", err=True)
        return
    click.echo(f"{'ID':10} {'SCOPE':6} {'CREATED':21} NAME")
    for row in rows:
        click.echo(f"{row['id']:10} {row['scope']:6} {row['created']:21} {row['name']}")


@web.group("cluster-token")
def cluster_token() -> None:
    """The token workers send each other on forwarded lookups (scope read)."""


@cluster_token.command("rotate")
def cluster_token_rotate() -> None:
    """Store a new random cluster token (secret web.cluster_token); the value is not
    printed. Workers sharing the credentials store pick it up within a few seconds; for
    workers reading it from a file or variable, set the same value there."""
    run(rotate_cluster_token(_provider()))
    click.echo(
        f"new cluster token stored as {CLUSTER_ENTRY}; workers use it within "
        f"{INDEX_TTL_S:g}s (during those, lookups forwarded with the old one are refused)"
    )
