"""The `agentstream` command line.

`agentstream worker` is Faust's own worker for this app (all of Faust's worker options
apply). Every other command is ours and built on `streams.client`. Agent packages add
their commands (`policy`, `agents`, `audit` ...) to the `cli` group from their modules
named `cli`; `streams` never names them: they are found in the packages of
AGENTSTREAM_AGENTS, as Faust's autodiscovery finds the agents.

Settings, and what `--help` touches
-----------------------------------
Settings are read when a command runs, never when the CLI starts: `--help` (of the CLI,
and of every command, `worker` included) needs none, contacts no broker and creates no
file or directory. So the command tree is built from the `cli` modules alone, without
the Faust app (whose creation makes the worker's data directory). When a command runs,
`CheckedCommand` first validates every setting — all problems at once, `Error:` one line
each, exit 2 — then loads the app and discovers the agents, whose tables and topics the
commands read; a command marked `without_agents` (built on the client, the settings and
the keychain alone) skips that.

Exit codes: 0 done; 1 rejected input or a pipeline error (broker, schema, credentials:
one line, `Error: <class>: <message>`); 2 usage and configuration errors (unknown command
or option, bad option value, missing file, bad settings); 3 (`replay`, `rebuild`,
`audit report`, `tail`) a read done, but records of it were deleted before they could be
read or could not be parsed by the Kafka client (`streams.cli.progress.EXIT_LOST`).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import importlib.util
import os
import pkgutil
import re
import sys
from collections.abc import Coroutine, Iterator, Mapping
from pathlib import Path
from typing import IO, Any, TypeVar

import click

from agentstream.schemas.errors import PipelineError
from agentstream.streams.settings import Settings, SettingsError, agent_modules

T = TypeVar("T")
C = TypeVar("C", bound=click.Command)


class ConfigError(click.ClickException):
    """A configuration problem (bad settings, a file a setting names): exit 2, one
    `Error:` line per problem."""

    exit_code = 2  # as click's UsageError: see the module doc

    def show(self, file: IO[Any] | None = None) -> None:
        for line in self.format_message().splitlines() or [""]:
            click.echo(f"Error: {line}", file=file, err=file is None)


class NoAdminKey(click.ClickException):
    """The admin key a rule change or chain key is signed with is missing, or the keychain
    that holds it is unusable: a credentials setup problem, exit 2 (as `ConfigError`),
    nothing published."""

    exit_code = 2


#: C0 controls, DEL and C1 controls: what a terminal may act on (ESC starts CSI and OSC
#: sequences; U+009B is a one-character CSI to some terminals; CR and LF rewrite lines)
# C0, DEL and C1 controls, and the bidi embeddings, overrides, isolates and marks: those
# reorder what follows on the screen, so a line can show other text than it holds
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def term_safe(value: object) -> str:
    """`value` as text a terminal only shows: every control character written as a
    visible escape (`\\x1b`, `\\n` ...). For every field of an event a sender chose (agent
    ids, model names, record ids) that a command prints as text rather than as JSON:
    raw, an OSC 52 sequence writes the operator's clipboard, and cursor moves hide lines;
    bidi controls are written `\\u202e` and so on. Also for every text of an HTTP answer
    (a worker's error, or a partition owner's it forwards) that a message quotes."""
    text = str(value)
    if not _CONTROL.search(text):
        return text
    return _CONTROL.sub(lambda m: repr(m.group())[1:-1], text)


def settings_error(exc: SettingsError) -> ConfigError:
    return ConfigError("\n".join(exc.problems))


def checked_settings() -> Settings:
    """The process-wide settings, or a `ConfigError` naming every bad variable (files the
    settings name that do not exist included)."""
    from agentstream.streams.settings import get_settings

    try:
        settings = get_settings()
    except SettingsError as exc:
        raise settings_error(exc) from None
    missing = missing_files(settings)
    if missing:
        raise ConfigError("\n".join(missing))
    return settings


#: settings naming a file that must exist when a command runs (the log file, keyring
#: file and secrets directory may not: they are created, or asked only when needed)
INPUT_FILES = (
    "kafka_ssl_cafile",
    "kafka_ssl_certfile",
    "kafka_ssl_keyfile",
    "web_tls_certfile",
    "web_tls_keyfile",
    "llm_providers_file",
)


def missing_files(settings: Settings) -> list[str]:
    """One line per file a setting names that is not there: said before the app is built
    (its TLS context would fail with a bare "No such file or directory")."""
    problems = []
    for name in INPUT_FILES:
        path = getattr(settings, name)
        if path is not None and not Path(path).is_file():
            what = "is a directory" if Path(path).is_dir() else "no such file"
            problems.append(f"{Settings.env_name(name)}={str(path)!r}: {what}")
    return problems


def load_app() -> Any:
    """The Faust app, built from the checked settings; a file they name that cannot be
    used (a certificate that is no PEM) is a `ConfigError`, not a traceback."""
    try:
        from agentstream.streams.app import app
    except OSError as exc:  # ssl.SSLError too
        raise ConfigError(f"the app cannot be built from these settings: {exc}") from None
    return app


def error_text(exc: PipelineError) -> str:
    """The one line a pipeline error ends a command with: `<class>: <message>` (a broker
    that does not answer says what to do about it: `kafka_security.connect_error`)."""
    return f"{type(exc).__name__}: {exc}"


def pipeline_error(exc: BaseException) -> click.ClickException | None:
    """The click error an exception of a command's work becomes (None: a bug, shown
    with its traceback): bad settings exit 2, every other pipeline error and aiokafka's
    own errors past a client's start exit 1."""
    if isinstance(exc, SettingsError):
        return settings_error(exc)
    if isinstance(exc, PipelineError):
        return click.ClickException(error_text(exc))
    from aiokafka.errors import KafkaError

    if isinstance(exc, KafkaError):
        return click.ClickException(f"BrokerError: Kafka refused the request: {exc}")
    return None


class CheckedCommand(click.Command):
    """A command that runs only with valid settings: they are checked after its
    arguments are parsed (so `--help` needs none), before its callback. Then the app and
    its agents are loaded, unless the command or a group above it is marked
    `without_agents`."""

    def invoke(self, ctx: click.Context) -> Any:
        prepare_run(with_agents=not _marked_without_agents(ctx))
        return super().invoke(ctx)


#: the attribute `without_agents` sets on a command or group
_WITHOUT_AGENTS = "agentstream_without_agents"


def without_agents(command: C) -> C:
    """Mark a command (or every command of a group) as one that needs neither the Faust
    app nor the agents: it works through `streams.client`, the settings and the keychain
    alone, as a Python program using `agentstream.Client` does. Loading and discovering
    the agents takes about 0.6 s of CPU; such a command (`publish`, `tail`, `config`,
    the keychain's) starts without it."""
    setattr(command, _WITHOUT_AGENTS, True)
    return command


def _marked_without_agents(ctx: click.Context | None) -> bool:
    while ctx is not None:
        if getattr(ctx.command, _WITHOUT_AGENTS, False):
            return True
        ctx = ctx.parent
    return False


class CliGroup(click.Group):
    """Every command below it, however deep, is a `CheckedCommand`."""

    command_class = CheckedCommand
    group_class = type  # subgroups are CliGroups too

    def resolve_command(
        self, ctx: click.Context, args: list[str]
    ) -> tuple[str | None, click.Command | None, list[str]]:
        try:
            return super().resolve_command(ctx, args)
        except click.UsageError:
            # an agent's command is missing because AGENTSTREAM_AGENTS is no list of
            # agents (`agent_packages`): that is the mistake to tell ("No such command
            # 'policy'" hid "did you mean 'security'?")
            if ctx.parent is None and not agents_setting_ok():
                checked_settings()
            raise


#: options of `agentstream` itself (before the command), each a setting's variable:
#: option -> (short form, metavar, variable, help). `main` applies them before anything reads the
#: settings, for every command, `worker` included.
GLOBAL_OPTIONS = {
    "--bootstrap-server": (
        "-b",
        "HOST:PORT",
        "AGENTSTREAM_KAFKA_BOOTSTRAP",
        "Kafka bootstrap servers, HOST:PORT[,HOST:PORT...] (AGENTSTREAM_KAFKA_BOOTSTRAP).",
    ),
    "--topic-prefix": (
        None,
        "PREFIX",
        "AGENTSTREAM_TOPIC_PREFIX",
        "Prefix of every catalogue topic, e.g. `staging.` (AGENTSTREAM_TOPIC_PREFIX).",
    ),
}


#: global options whose empty value is a mistake (an empty topic prefix is the default)
NON_EMPTY_GLOBALS = ("AGENTSTREAM_KAFKA_BOOTSTRAP",)


def split_global_options(args: list[str]) -> tuple[dict[str, str], list[str]]:
    """The settings the leading global options of `args` set, and the rest of `args`
    (the command and its own options). `--opt value`, `--opt=value` and `-b value`; a
    global option without its value is a `click.UsageError`."""
    by_flag: dict[str, str] = {}
    for long, (short, _, variable, _) in GLOBAL_OPTIONS.items():
        by_flag[long] = variable
        if short:
            by_flag[short] = variable
    env: dict[str, str] = {}
    rest = list(args)
    while rest:
        flag, eq, inline = rest[0].partition("=")
        if flag not in by_flag:
            break
        if eq:
            value, rest = inline, rest[1:]
        elif len(rest) > 1 and not rest[1].startswith("-"):
            value, rest = rest[1], rest[2:]
        else:
            raise click.UsageError(f"Option '{flag}' requires an argument.")
        if not value.strip() and by_flag[flag] in NON_EMPTY_GLOBALS:
            # an empty variable is an unset one (`Settings.from_env`): `-b ""` went
            # to the default broker without a word
            raise click.UsageError(f"Option '{flag}': an empty value (name HOST:PORT)")
        env[by_flag[flag]] = value
    return env, rest


def _set_global(ctx: click.Context, param: click.Parameter, value: str | None) -> None:
    # `main` has applied the leading ones; this covers `cli` invoked directly (tests)
    if value is not None and param.name is not None:
        variable = GLOBAL_OPTIONS["--" + param.name.replace("_", "-")][2]
        if not value.strip() and variable in NON_EMPTY_GLOBALS:
            raise click.BadParameter("an empty value (name HOST:PORT)")
        os.environ[variable] = value
        from agentstream.streams.settings import get_settings

        get_settings.cache_clear()


def _global_options(f: Any) -> Any:
    for long, (short, metavar, _, text) in reversed(GLOBAL_OPTIONS.items()):
        names = [long, short] if short else [long]
        f = click.option(
            *names,
            metavar=metavar,
            expose_value=False,
            is_eager=True,
            callback=_set_global,
            help=text,
        )(f)
    return f


@click.group(cls=CliGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="agentstream", prog_name="agentstream")
@_global_options
def cli() -> None:
    """agentstream: event-sourced stream processing for multi-agent LLM platforms.

    Settings come from AGENTSTREAM_* environment variables (`agentstream config` shows
    them); the options above set the most common ones for one command."""


def json_option(*, lines: bool = False) -> Any:
    """`--json`, with one meaning in every command: the result as JSON on stdout instead
    of text — one JSON line per item for a listing (`lines`), else one JSON document."""
    text = (
        "Print one JSON object per line instead of text."
        if lines
        else "Print the result as one JSON document instead of text."
    )
    return click.option("--json", "as_json", is_flag=True, help=text)


def record_output_options(f: Any) -> Any:
    """`--format`, `--meta`, `--show-secrets`: how `tail` and `replay` print a record (the
    same way: `ReplayRecord.render`)."""
    from agentstream.streams.replay import OUTPUT_FORMATS

    f = click.option(
        "--show-secrets",
        is_flag=True,
        help="Print access tokens, passwords, API keys... as they are (default: [REDACTED]).",
    )(f)
    f = click.option(
        "--meta",
        is_flag=True,
        help="Also print each record's topic, partition, offset, timestamp_ms and key.",
    )(f)
    return click.option(
        "--format",
        "fmt",
        type=click.Choice(OUTPUT_FORMATS),
        default="json",
        show_default=True,
        help="json: one line per record, the event as on the wire; pretty: indented JSON; "
        "raw: the value's bytes.",
    )(f)


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine for a command; its errors become one clean line (`pipeline_error`:
    exit 1, or 2 for bad settings)."""
    try:
        return asyncio.run(coro)
    except Exception as exc:
        error = pipeline_error(exc)
        if error is None:
            raise
        raise error from exc


def time_option(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """Callback of a time option (ISO-8601, `now`, -15m / -2h / -1d, epoch ms): a value
    that is none of these is a usage error when parsed, before anything connects."""
    if value is not None:
        parse_time_or_usage(value)
    return value


def parse_time_or_usage(value: str) -> Any:
    from agentstream.streams.replay import TimeParseError, parse_time

    try:
        return parse_time(value)
    except TimeParseError as exc:
        raise click.BadParameter(str(exc)) from None
    except (ValueError, OverflowError, OSError):  # epoch milliseconds beyond any date
        raise click.BadParameter(f"cannot parse time {value!r}: out of range") from None


def check_time_range(since: str | None, until: str | None) -> None:
    """`--until` before `--since` is a usage error (each is checked by `time_option`)."""
    if since is None or until is None:
        return
    from agentstream.streams.replay import parse_time

    now = parse_time("now")
    if parse_time(until, now=now) < parse_time(since, now=now):
        raise click.UsageError(f"--until {until} is before --since {since}")


def worker_url(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """Callback of a worker's `--url` (`top`, `checkpoints --take`): http(s)://HOST[:PORT],
    checked before anything is asked (a port out of range read as "no worker answering",
    a URL without a scheme as httpx's "missing an 'http://' or 'https://' protocol")."""
    from yarl import URL

    if value is None:
        return value
    try:
        ok = value.startswith(("http://", "https://")) and bool(URL(value).host)
        URL(value).port  # noqa: B018 - raises ValueError when out of range
    except ValueError:
        ok = False
    if not ok:
        raise click.BadParameter(f"{value!r} is not a URL (http://HOST:PORT)")
    return value


def non_empty(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
    """Callback of an option naming something (a key id, a keychain entry): an empty
    value is a usage error. Unchecked, `--id ""` fell back to the default id and
    `--signing-key ""` stored a key under an empty name."""
    if isinstance(value, str) and not value.strip():
        raise click.BadParameter("an empty value: name one")
    return value


def output_file(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
    """Callback of an output file option: a name, in a directory that exists, checked
    before the command reads anything (not after minutes of work)."""
    if value is not None and os.path.isdir(value):
        # click.Path(dir_okay=False) lets "" through as Path("."), the working directory:
        # found only when writing, after the whole read
        what = "an empty name (or '.')" if str(value) in ("", ".") else f"{value}"
        raise click.BadParameter(f"{what} is a directory: name a file")
    if value is not None and not os.path.isdir(os.path.dirname(os.path.abspath(value))):
        raise click.BadParameter(f"{value}: no such directory {os.path.dirname(str(value))!r}")
    return value


def finite_seconds(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
    """Callback of a duration option: click's FloatRange lets nan and inf through (a nan
    timeout never ran out; an inf one ended in an OverflowError traceback)."""
    import math

    if value is not None and not math.isfinite(value):
        raise click.BadParameter(f"{value}: a finite number of seconds")
    return value


def finite_number(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
    """Callback of a rate or a count given as a float: as `finite_seconds`."""
    import math

    if value is not None and not math.isfinite(value):
        raise click.BadParameter(f"{value}: a finite number")
    return value


@contextlib.contextmanager
def atomic_output(path: Path) -> Iterator[IO[bytes]]:
    """A file written next to `path` and renamed over it only when the block ends without
    an error: a command that fails (the broker away, an interrupt) leaves an existing
    file as it was, where opening `path` for writing cut an earlier replay to nothing.

    A symlink is followed (the file it names is replaced, the link stays); a target that
    exists and is not a regular file (a FIFO, /dev/null, a terminal) is written straight
    through, as a shell's `>` would: renaming over it replaced the device or the pipe
    with a file. A temporary file that cannot be made is reported with `path`, the name
    the user gave."""
    target = Path(os.path.realpath(path))
    if target.exists() and not target.is_file():
        with target.open("wb") as out:
            yield out
        return
    part = target.with_name(f".{target.name}.{os.getpid()}.part")
    try:
        out = part.open("wb")
    except OSError as exc:
        raise OSError(exc.errno, f"cannot write a file there: {exc.strerror}", str(path)) from None
    try:
        yield out
        out.close()
        os.replace(part, target)
    except BaseException:
        out.close()
        with contextlib.suppress(OSError):
            part.unlink()
        raise


def web_root() -> str:
    """This host's worker web root (AGENTSTREAM_WEB_HOST/PORT; a wildcard bind is asked
    on loopback; https with AGENTSTREAM_WEB_TLS_CERTFILE)."""
    from agentstream.streams.settings import get_settings, url_host
    from agentstream.streams.web_auth import web_scheme

    s = get_settings()
    host = "127.0.0.1" if s.web_host in ("0.0.0.0", "::", "") else url_host(s.web_host)
    return f"{web_scheme(s)}://{host}:{s.web_port}"


def cli_token() -> tuple[str | None, str]:
    """The token the CLI sends to worker views (secret `web.token` of the credentials
    chain), or None and why there is none — said only if a worker then asks for one
    (with AGENTSTREAM_WEB_AUTH=off nothing is needed)."""
    from agentstream.streams.credentials import KeychainCredentialsProvider
    from agentstream.streams.errors import CredentialsError
    from agentstream.streams.settings import get_settings
    from agentstream.streams.web_auth import CLI_ENTRY

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

    from agentstream.streams.settings import get_settings
    from agentstream.streams.web_auth import client_verify

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


class ForeignAnswer(click.ClickException):
    """What answered at a worker's web address is not an agentstream worker's view (a
    web server of something else on that port, a proxy's page): one line, exit 1."""

    def __init__(self, resp: Any, detail: str) -> None:
        super().__init__(f"{resp.url}: not an agentstream worker's answer ({term_safe(detail)})")


def worker_json(resp: Any, *keys: str) -> dict[str, Any]:
    """The body of a worker view's answer: a JSON object with `keys` (what the view
    always sends), else a `ForeignAnswer` — HTML, a list or an unexpected object ended
    in a JSONDecodeError, TypeError or KeyError traceback, or (`llm usage`) in nothing
    printed and exit 0."""
    try:
        body = resp.json()
    except ValueError:
        kind = resp.headers.get("content-type", "no content type").split(";")[0]
        raise ForeignAnswer(resp, f"not JSON but {kind}") from None
    if not isinstance(body, dict):
        raise ForeignAnswer(resp, f"a JSON {type(body).__name__}, not an object")
    missing = [k for k in keys if k not in body]
    if missing:
        raise ForeignAnswer(resp, f"no {', '.join(repr(k) for k in missing)} in its JSON")
    return body


@contextlib.contextmanager
def reading_answer(resp: Any) -> Iterator[None]:
    """Showing the fields of a worker's answer: one of another shape than a view sends
    (a row that is no object, a count that is no number) is a `ForeignAnswer`."""
    try:
        yield
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
        raise ForeignAnswer(resp, f"{type(exc).__name__}: {exc}") from None


def _error_text(resp: Any) -> str:
    try:
        body = resp.json()
    except ValueError:
        body = None
    # the answer may be forwarded from another worker: its text is shown, never obeyed
    if isinstance(body, dict) and body.get("error"):
        reason = f": {body['reason']}" if body.get("reason") else ""
        return term_safe(f"{body['error']}{reason}"[:500])
    return term_safe((resp.text or resp.reason_phrase or "").strip()[:500])


def agent_packages(environ: Mapping[str, str] | None = None) -> list[str]:
    """The agent packages of AGENTSTREAM_AGENTS, read from the environment itself: the
    command tree is built before (and without) validating the settings."""
    env = os.environ if environ is None else environ
    raw = env.get(Settings.env_name("agents")) or str(Settings.model_fields["agents"].default)
    try:
        return agent_modules(raw)
    except ValueError:  # told, with the other settings' problems, before any command runs
        return []


def agents_setting_ok(environ: Mapping[str, str] | None = None) -> bool:
    env = os.environ if environ is None else environ
    raw = env.get(Settings.env_name("agents")) or str(Settings.model_fields["agents"].default)
    try:
        agent_modules(raw)
    except ValueError:
        return False
    return True


def command_modules(package: str) -> list[str]:
    """The modules named `cli` in `package` and its subpackages, found on disk without
    importing any of them (an agent's other modules build tables on the app)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return []
    found: list[str] = []

    def walk(paths: list[str], prefix: str) -> None:
        for info in sorted(pkgutil.iter_modules(paths), key=lambda i: i.name):
            if info.ispkg:
                walk([os.path.join(p, info.name) for p in paths], f"{prefix}{info.name}.")
            elif info.name == "cli":
                found.append(prefix + info.name)

    walk(list(spec.submodule_search_locations), f"{package}.")
    return found


def load_commands(environ: Mapping[str, str] | None = None) -> None:
    """Import every command module of this package, then the agent packages' `cli`
    modules — no settings needed, nothing created (see the module doc)."""
    for info in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{info.name}")
    for package in agent_packages(environ):
        try:
            for name in command_modules(package):
                importlib.import_module(name)
        except ImportError as exc:
            # A broken agent package must not take `kafka stop` or `tail` down with it;
            # the worker itself still refuses to start (AgentStreamApp fails loudly).
            _unavailable(exc)


def _unavailable(exc: ImportError) -> None:
    click.echo(f"warning: some commands are unavailable: {one_line(exc)}", err=True)


def one_line(exc: BaseException) -> str:
    """An import failure's cause on one line (a parser's message quotes the file)."""
    text = str(exc.__cause__ or exc)
    return "; ".join(x.strip() for x in text.splitlines() if x.strip())


_loaded = False


def prepare_run(*, with_agents: bool = True) -> None:
    """Before a command runs: every setting valid (else exit 2), then (`with_agents`)
    the app and its agents loaded, as a worker has them (tables registered, topics
    declared)."""
    global _loaded
    checked_settings()
    # quiets aiokafka's start-up noise (`NewTopicNoise`) for every command, including
    # those that never load the app, which would otherwise import it
    import agentstream.streams.logging_setup  # noqa: F401

    if _loaded or not with_agents:
        return
    _loaded = True
    app = load_app()
    try:
        app.discover()
    except ImportError as exc:
        # as a worker would refuse to start; a command not reading that agent's tables
        # still works
        click.echo(f"warning: the agents did not all load: {one_line(exc)}", err=True)


def install_web_auth() -> None:
    """The worker's web views authenticate every request (`streams.web_auth`): the
    middleware goes on Faust's web application here, before any view module is imported
    or the server started, so no view has to remember it."""
    from agentstream.streams import web_auth

    app = load_app()
    web_auth.install(app, app.agentstream_settings)


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        try:
            env, args = split_global_options(args)
        except click.UsageError as exc:
            exc.show()
            sys.exit(exc.exit_code)
        if env:
            os.environ.update(env)
            from agentstream.streams.settings import get_settings

            get_settings.cache_clear()
        if args[:1] == ["worker"]:
            from agentstream.streams.cli.core import check_worker, run_worker, worker_args

            faust_args = worker_args(args[1:])
            check_worker(faust_args)  # --help, bad options, bad settings: nothing built yet
            install_web_auth()
            run_worker(faust_args)
            return
        load_commands()
        cli.main(args=args, prog_name="agentstream")
    except click.ClickException as exc:  # raised outside click's own main (the worker)
        exc.show()
        sys.exit(exc.exit_code)
    except (PipelineError, OSError) as exc:
        # raised by a command outside `run`; an OSError naming a file is a path the
        # user gave (or a setting did) that cannot be read or written
        error = pipeline_error(exc)
        if error is None and isinstance(exc, OSError) and exc.filename is not None:
            error = click.UsageError(f"{exc.filename}: {exc.strerror or exc}")
        if error is None:
            raise
        error.show()
        sys.exit(error.exit_code)
