"""The progress bar of the commands that read whole topics (`replay`, `rebuild`,
`audit verify`, `audit report`).

The readers count into a `streams.replay.Progress` (offsets planned and consumed, records
written); the bar here only looks at it: `run_with_progress` runs a command's coroutine
and, from a thread of its own, redraws the bar from the counter every `EVERY_S` while it
runs. The bar is tqdm's, on stderr, and only when stderr is a terminal — never in a pipe,
a CI log or a captured stderr — unless `--progress` / `--no-progress` says otherwise.
Nothing of it ever goes to stdout, so a command's output (JSON, a report, replayed lines)
is the same with or without it.

Offsets a read found deleted before it could reach them (`Progress.lost`) are reported
after it, one `WARNING:` line each on stderr (`warn_lost`); records the Kafka client
could not parse (`Progress.unreadable`, `streams.record_batches`) one line each as they
are met (`unreadable_reporter`) and their count after the read (`warn_unreadable`).
Either way the command exits `EXIT_LOST`.
"""

from __future__ import annotations

import contextlib
import sys
import threading
from collections.abc import Callable, Coroutine
from typing import IO, TYPE_CHECKING, Any, TypeVar

import click

from agentstream.streams.cli import run
from agentstream.streams.replay import Progress

if TYPE_CHECKING:
    from tqdm import tqdm

T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])

#: seconds between two redraws
EVERY_S = 0.2

#: records read of the offset total (`read`, `of`: the counts with thousands separators,
#: "?" while the total is unknown), then what `postfix` adds (records written), then
#: tqdm's elapsed<remaining and rate
BAR_FORMAT = (
    "{desc}: {percentage:3.0f}%|{bar}| {read}/{of} read{postfix}"
    " [{elapsed}<{remaining}, {rate_fmt}]"
)


#: the exit status of a command that read a range of history through, but without the
#: records of offsets deleted before it could read them (`Progress.lost`) or of records
#: the Kafka client could not parse (`Progress.unreadable`): its output is written and
#: incomplete, which is neither a failure (1: nothing written) nor a pass
EXIT_LOST = 3


def warn_lost(progress: Progress) -> bool:
    """One `WARNING:` line on stderr per gap of `progress.lost`; whether there was any."""
    for gap in progress.lost:
        click.echo(f"WARNING: {gap.describe()}", err=True)
    return bool(progress.lost)


def unreadable_reporter(command: str) -> Callable[[str], None]:
    """The `on_unreadable` of a reader run by `command`: one line on stderr per record
    the Kafka client cannot parse, as the read meets it (`streams.replay.replay`)."""

    def say(text: str) -> None:
        click.echo(f"{command}: skipped a record the Kafka client cannot parse: {text}", err=True)

    return say


def warn_unreadable(progress: Progress) -> bool:
    """The count of `progress.unreadable` on stderr, once the read is over; whether
    there was any."""
    if progress.unreadable:
        click.echo(
            f"skipped {progress.unreadable} record(s) the Kafka client cannot parse", err=True
        )
    return bool(progress.unreadable)


def incomplete(progress: Progress) -> bool:
    """Say what a read of history lacks (`warn_lost`, `warn_unreadable`): whether the
    command is to exit `EXIT_LOST`."""
    lost = warn_lost(progress)
    return warn_unreadable(progress) or lost


def progress_option(f: F) -> F:
    """`--progress/--no-progress` (parameter `progress`: None when not given)."""
    return click.option(
        "--progress/--no-progress",
        "progress",
        default=None,
        help="Show a progress bar on stderr (default: only when stderr is a terminal).",
    )(f)


def is_terminal(stream: IO[str]) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def wanted(flag: bool | None, stream: IO[str]) -> bool:
    """--progress / --no-progress when given, else whether `stream` is a terminal."""
    return is_terminal(stream) if flag is None else flag


class ProgressBar:
    """A tqdm bar drawn from a `Progress`: it reads the counter, never counts itself.

    `desc` names the command (a `Progress.stage` is added to it); `written` adds the
    records written (`Progress.emitted`) for a command whose output is records. The total
    is an offset span, an upper bound on the records: a read can end below 100%."""

    def __init__(
        self, progress: Progress, stream: IO[str], *, desc: str, written: bool = False
    ) -> None:
        self.p = progress
        self.stream = stream
        self.desc = desc
        self.written = written
        self._bar: tqdm[Any] | None = None

    def _make(self) -> tqdm[Any]:
        from tqdm import tqdm

        class Bar(tqdm):
            # tqdm's monitor thread redraws bars whose updates it throttles: this one is
            # redrawn by `run_with_progress` and throttles nothing
            monitor_interval = 0

            @property
            def format_dict(self) -> dict[str, Any]:
                # tqdm's documented way to add fields to `bar_format`
                d = dict(super().format_dict)
                d["read"] = f"{d['n']:,}"
                d["of"] = "?" if d["total"] is None else f"{d['total']:,}"
                return d

        return Bar(
            total=self.p.total or None,
            desc=self.desc,
            file=self.stream,
            position=0,  # the line of the cursor, whatever other bars the process made
            unit=" rec",
            unit_scale=True,
            dynamic_ncols=True,
            bar_format=BAR_FORMAT,
            mininterval=0,
            miniters=0,
            leave=True,
        )

    def refresh(self, *, final: bool = False) -> None:
        """Redraw from the counter. Until a read has planned its partitions the total is
        unknown ("?"), unless this is the last state."""
        bar = self._bar
        if bar is None:
            bar = self._bar = self._make()
        desc = f"{self.desc} {self.p.stage}" if self.p.stage else self.desc
        if desc != bar.desc:
            bar.set_description_str(desc, refresh=False)
        total = self.p.total if self.p.total or final else None
        if bar.total != total:
            bar.total = total
        if self.written:
            bar.set_postfix_str(f"{self.p.emitted:,} written", refresh=False)
        bar.update(self.p.done - bar.n)  # miniters=0: redraws even when nothing moved

    def close(self) -> None:
        """The last state, left on its own line; a bar that had nothing to count (the
        ranges were empty, or the command failed before it knew them) is erased."""
        self.refresh(final=True)
        if self._bar is not None:
            if not self.p.total:
                self._bar.leave = False
            self._bar.close()
            self._bar = None


def run_with_progress(
    coro: Coroutine[Any, Any, T],
    progress: Progress,
    flag: bool | None,
    *,
    desc: str,
    written: bool = False,
    stream: IO[str] | None = None,
    every_s: float = EVERY_S,
) -> T:
    """`run(coro)` (errors become one line), with a bar over `progress` on stderr (or
    `stream`) while it runs when `flag` says so, or when it is None and that stream is a
    terminal."""
    out = sys.stderr if stream is None else stream
    if not wanted(flag, out):
        return run(coro)
    bar = ProgressBar(progress, out, desc=desc, written=written)
    try:
        bar.refresh()  # tqdm is set up here, not in the thread
    except OSError:
        return run(coro)
    stop = threading.Event()

    def redraw() -> None:
        # A thread, not a task of the command's event loop: it redraws on time while the
        # loop is busy with a long stretch of work between two awaits (checking a
        # partition's chain, folding a table); the counter is only read.
        while not stop.wait(every_s):
            try:
                bar.refresh()
            except OSError:  # stderr gone (a closed terminal): go on without a bar
                return

    drawer = threading.Thread(target=redraw, name="progress-bar", daemon=True)
    drawer.start()
    try:
        return run(coro)
    finally:
        stop.set()
        drawer.join()
        with contextlib.suppress(OSError):
            bar.close()
