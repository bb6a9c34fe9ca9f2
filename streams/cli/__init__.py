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
