"""`agentstream credentials set|get|delete`: the keychain entries of the pipeline.

Exactly one selector names the entry: ``--user-id N`` (an access token; with `set` it
also becomes the current credentials), ``--signing-key AGENT``, ``--encryption-key ID`` or
``--secret NAME``. Values are read from a hidden prompt or, with ``--stdin``, from standard
input — never from the command line, where they would land in shell history and `ps`.
Keys can be generated (``--generate``). `get` masks the value unless ``--reveal``.
"""

from __future__ import annotations

import base64
import sys
from dataclasses import dataclass

import click

from agentstream.streams.cli import cli, non_empty, run, without_agents
from agentstream.streams.credentials import KeychainCredentialsProvider, mask
from agentstream.streams.errors import CredentialsError, CredentialsNotFound


@dataclass(frozen=True)
class Entry:
    kind: str  # user | signing | encryption | secret | current
    name: str


def _selector(
    user_id: int | None, signing_key: str | None, encryption_key: str | None, secret: str | None
) -> Entry:
    chosen = [
        Entry(kind, str(value))
        for kind, value in (
            ("user", user_id),
            ("signing", signing_key),
            ("encryption", encryption_key),
            ("secret", secret),
        )
        if value is not None
    ]
    if len(chosen) > 1:
        raise click.UsageError(
            "name one entry: --user-id, --signing-key, --encryption-key or --secret"
        )
    return chosen[0] if chosen else Entry("current", "")


def _selectors(fn: click.decorators.FC) -> click.decorators.FC:
    for option in reversed(
        (
            click.option("--user-id", type=int, help="The access token of this user."),
            click.option(
                "--signing-key",
                metavar="AGENT",
                callback=non_empty,
                help="The HMAC key of this agent.",
            ),
            click.option(
                "--encryption-key",
                metavar="KEY_ID",
                callback=non_empty,
                help="An AES-256 envelope key.",
            ),
            click.option(
                "--secret",
                metavar="NAME",
                callback=non_empty,
                help="A generic secret, e.g. llm.openai.api_key.",
            ),
        )
    ):
        fn = option(fn)
    return fn


def _provider() -> KeychainCredentialsProvider:
    try:
        return KeychainCredentialsProvider()
    except CredentialsError as exc:
        raise click.ClickException(f"{type(exc).__name__}: {exc}") from exc


@without_agents
@cli.group()
def credentials() -> None:
    """Secrets in the OS keychain (tokens, signing and encryption keys, API keys)."""


@credentials.command("set")
@_selectors
@click.option("--stdin", "from_stdin", is_flag=True, help="Read the value from standard input.")
@click.option("--generate", is_flag=True, help="Generate a random 32-byte key (keys only).")
def credentials_set(
    user_id: int | None,
    signing_key: str | None,
    encryption_key: str | None,
    secret: str | None,
    from_stdin: bool,
    generate: bool,
) -> None:
    """Store a value in the keychain."""
    entry = _selector(user_id, signing_key, encryption_key, secret)
    if entry.kind == "current":
        raise click.UsageError(
            "say what to set: --user-id, --signing-key, --encryption-key or --secret"
        )
    if generate:
        if entry.kind not in ("signing", "encryption"):
            raise click.UsageError(
                "--generate makes keys: use it with --signing-key or --encryption-key"
            )
        import os

        key = os.urandom(32)
    else:
        if from_stdin:
            try:
                value = sys.stdin.buffer.read().decode("utf-8").strip()
            except UnicodeDecodeError:
                # else it reached the keychain as surrogates, which blamed the keychain
                raise click.ClickException("the value on stdin is not UTF-8 text") from None
        elif not sys.stdin.isatty():
            # the hidden prompt needs a terminal: a pipe gave GetPassWarning lines, then
            # "Aborted!" (a value piped in is what --stdin is for)
            err = click.ClickException(
                "stdin is not a terminal: to read the value from it, add --stdin"
            )
            err.exit_code = 2  # a usage mistake, said in one line
            raise err
        else:
            value = click.prompt("value", hide_input=True, confirmation_prompt=True).strip()
        if not value:
            raise click.ClickException("empty value: nothing stored")
        if entry.kind in ("signing", "encryption"):
            try:
                key = base64.b64decode(value, validate=True)
            except ValueError:
                raise click.ClickException("a key is given in base64") from None
    provider = _provider()
    if entry.kind == "user":
        run(provider.write_credentials(int(entry.name), value))
    elif entry.kind == "signing":
        run(provider.set_signing_key(entry.name, key))
    elif entry.kind == "encryption":
        run(provider.set_encryption_key(entry.name, key))
    else:
        run(provider.set_secret(entry.name, value))
    click.echo(f"stored {entry.kind} {entry.name} in {provider.write_target}")


@credentials.command("get")
@_selectors
@click.option("--reveal", is_flag=True, help="Print the value itself instead of a mask.")
def credentials_get(
    user_id: int | None,
    signing_key: str | None,
    encryption_key: str | None,
    secret: str | None,
    reveal: bool,
) -> None:
    """Show an entry (masked unless --reveal); without a selector, the current credentials."""
    entry = _selector(user_id, signing_key, encryption_key, secret)
    provider = _provider()
    label = f"{entry.kind} {entry.name}".strip()
    value: str | None
    if entry.kind == "current":
        creds = run(provider.read_credentials())
        if creds is None:
            raise click.ClickException("no credentials stored")
        label = f"user {creds.user_id}"
        value = creds.access_token.get_secret_value()
    elif entry.kind == "user":
        value = run(provider.get_access_token(int(entry.name)))
    elif entry.kind in ("signing", "encryption"):
        getter = (
            provider.get_signing_key if entry.kind == "signing" else provider.get_encryption_key
        )
        key = run(getter(entry.name))
        value = None if key is None else base64.b64encode(key).decode()
    else:
        value = run(provider.get_secret(entry.name))
    if value is None:
        raise click.ClickException(f"{label}: not in the keychain")
    click.echo(f"{label}: {value if reveal else mask(value)}")


@credentials.command("delete")
@_selectors
def credentials_delete(
    user_id: int | None, signing_key: str | None, encryption_key: str | None, secret: str | None
) -> None:
    """Remove an entry; without a selector, the current credentials."""
    entry = _selector(user_id, signing_key, encryption_key, secret)
    provider = _provider()
    try:
        if entry.kind == "current":
            run(provider.delete_credentials())
        elif entry.kind == "user":
            run(provider._delete(f"access_token.{int(entry.name)}", missing_ok=False))
        elif entry.kind == "signing":
            run(provider._delete(f"signing_key.{entry.name}", missing_ok=False))
        elif entry.kind == "encryption":
            run(provider._delete(f"encryption_key.{entry.name}", missing_ok=False))
        else:
            run(provider._delete(entry.name, missing_ok=False))
    except click.ClickException as exc:
        if isinstance(exc.__cause__, CredentialsNotFound):
            raise click.ClickException(f"{entry.kind} {entry.name}: not in the keychain") from None
        raise
    click.echo(f"deleted {entry.kind} {entry.name}".strip())


__all__ = ["CredentialsError", "credentials"]
