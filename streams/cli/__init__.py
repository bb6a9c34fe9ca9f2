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
    on loopback)."""
    from streams.settings import get_settings

    s = get_settings()
    host = "127.0.0.1" if s.web_host in ("0.0.0.0", "::", "") else s.web_host
    return f"http://{host}:{s.web_port}"


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
    """
    import httpx

    url = (base or web_root()).rstrip("/") + path
    try:
        # a worker is reached directly: HTTP_PROXY from the environment would route
        # loopback and cluster-internal addresses through a proxy
        with httpx.Client(trust_env=False, timeout=timeout) as http:
            resp = http.request(method, url, params=params)
    except httpx.TimeoutException as exc:
        raise click.ClickException(f"the worker at {url} did not answer in {timeout:g}s") from exc
    except httpx.HTTPError as exc:
        raise click.ClickException(f"no worker answering at {url}: {exc}") from exc
    if resp.status_code < 400 or resp.status_code in allow:
        return resp
    reason = _error_text(resp)
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
        return str(body["error"])[:500]
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


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["worker"]:
        from streams.cli.core import run_worker

        run_worker(args[1:])
        return
    load_commands()
    cli.main(args=args, prog_name="agentstream")
