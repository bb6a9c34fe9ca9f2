"""The `agentstream` command line.

`agentstream worker` is Faust's own worker for this app (all of Faust's worker options
apply). Every other command is ours and built on `streams.client`. Agent packages add
their commands (`policy`, `agents`, `audit` ...) to the `cli` group at import time; the
entry point imports them through Faust's autodiscovery, so `streams` never names them.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Coroutine
from typing import Any, TypeVar

import click

from schemas.errors import PipelineError

T = TypeVar("T")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """agentstream: event-sourced stream processing for multi-agent LLM platforms."""


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine for a command; pipeline errors become a clean message + exit 1."""
    try:
        return asyncio.run(coro)
    except PipelineError as exc:
        raise click.ClickException(f"{type(exc).__name__}: {exc}") from exc


def web_root() -> str:
    """This host's worker web root (AGENTSTREAM_WEB_HOST/PORT; a wildcard bind is asked
    on loopback; https with AGENTSTREAM_WEB_TLS_CERTFILE)."""
    from streams.settings import get_settings
    from streams.web_auth import web_scheme

    s = get_settings()
    host = "127.0.0.1" if s.web_host in ("0.0.0.0", "::", "") else s.web_host
    return f"{web_scheme(s)}://{host}:{s.web_port}"


def cli_token() -> tuple[str | None, str]:
    """The token the CLI sends to worker views (secret `web.token` of the credentials
    chain), or None and why there is none — said only if a worker then asks for one
    (with AGENTSTREAM_WEB_AUTH=off nothing is needed)."""
    from streams.credentials import KeychainCredentialsProvider
    from streams.errors import CredentialsError
    from streams.settings import get_settings
    from streams.web_auth import CLI_ENTRY

    try:
        value = KeychainCredentialsProvider(get_settings()).get_secret_sync(CLI_ENTRY)
    except CredentialsError as exc:
        return None, f"the secret {CLI_ENTRY} cannot be read: {exc}"
    if value is None:
        return None, f"there is no secret {CLI_ENTRY}"
    return value, ""


#: how to give the CLI a token (the end of a 401's message)
CLI_AUTH_HINT = (
    "store one with `agentstream web token create --scope admin --name cli --for-cli` "
    "(or set AGENTSTREAM_SECRET_WEB_TOKEN with AGENTSTREAM_SECRET_SOURCES=env,...)"
)


def worker_call(
    path: str,
    *,
    method: str = "GET",
    params: dict[str, str] | None = None,
    base: str | None = None,
    timeout: float = 10,
    allow: tuple[int, ...] = (),
) -> Any:
    """Call a worker web view; every failure becomes a clean message and exit 1.

    No worker listening, a timeout, a 503 (the worker cannot answer for the whole
    cluster right now: a rebalance, or the partition owner not answering; the view's
    reason is quoted) and any other error status are told apart. Statuses in `allow`
    (a 404 the command explains itself) are returned to the caller.

    The CLI's token (`cli_token`) goes as the bearer; a 401 or 403 is one line saying
    what the worker said and how to get a token.
    """
    import httpx

    from streams.settings import get_settings
    from streams.web_auth import client_verify

    url = (base or web_root()).rstrip("/") + path
    token, no_token = cli_token()
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        # a worker is reached directly: HTTP_PROXY from the environment would route
        # loopback and cluster-internal addresses through a proxy
        with httpx.Client(
            trust_env=False, timeout=timeout, verify=client_verify(get_settings())
        ) as http:
            resp = http.request(method, url, params=params, headers=headers)
    except httpx.TimeoutException as exc:
        raise click.ClickException(f"the worker at {url} did not answer in {timeout:g}s") from exc
    except httpx.HTTPError as exc:
        raise click.ClickException(f"no worker answering at {url}: {exc}") from exc
    if resp.status_code < 400 or resp.status_code in allow:
        return resp
    reason = _error_text(resp)
    if resp.status_code == 401:
        sent = "the CLI's token (secret web.token) was refused" if token else no_token
        raise click.ClickException(f"{url}: HTTP 401: {reason}; {sent}: {CLI_AUTH_HINT}")
    if resp.status_code == 403:
        raise click.ClickException(
            f"{url}: HTTP 403: {reason} (the CLI's token is secret web.token)"
        )
    if resp.status_code == 503:
        raise click.ClickException(
            f"the worker at {url} cannot answer now: {reason} "
            "(a rebalance may be in progress; try again in a few seconds)"
        )
    raise click.ClickException(f"{url}: HTTP {resp.status_code}: {reason}")


def _error_text(resp: Any) -> str:
    try:
        body = resp.json()
    except ValueError:
        body = None
    if isinstance(body, dict) and body.get("error"):
        reason = f": {body['reason']}" if body.get("reason") else ""
        return f"{body['error']}{reason}"[:500]
    return (resp.text or resp.reason_phrase or "").strip()[:500]


def load_commands() -> None:
    """Import every command module of this package, then the agents' (via Faust
    autodiscovery, so `streams` never names an agent package)."""
    import importlib
    import pkgutil

    for info in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{info.name}")
    from streams.app import app

    try:
        app.discover()
    except ImportError as exc:
        # A broken agent package must not take `kafka stop` or `tail` down with it; the
        # worker itself still refuses to start (AgentStreamApp fails loudly).
        click.echo(f"warning: some commands are unavailable: {exc.__cause__ or exc}", err=True)


def install_web_auth() -> None:
    """The worker's web views authenticate every request (`streams.web_auth`): the
    middleware goes on Faust's web application here, before any view module is imported
    or the server started, so no view has to remember it."""
    from streams import web_auth
    from streams.app import app, settings

    web_auth.install(app, settings)


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["worker"]:
        from streams.cli.core import run_worker

        install_web_auth()
        run_worker(args[1:])
        return
    load_commands()
    cli.main(args=args, prog_name="agentstream")
