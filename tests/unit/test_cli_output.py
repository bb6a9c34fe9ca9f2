"""Where a command's `--out FILE` writes (`streams.cli.atomic_output`, `output_file`): a
regular file is replaced whole only once the command succeeded; a symlink keeps being a
link; a FIFO or a device is written through, never replaced by a file."""

from __future__ import annotations

import os
import stat
import threading
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from agentstream.streams.cli import atomic_output, output_file


def test_a_regular_file_is_replaced_only_when_the_block_ends(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    out.write_bytes(b"old\n")
    with pytest.raises(RuntimeError), atomic_output(out) as f:
        f.write(b"half")
        raise RuntimeError("the broker went away")
    assert out.read_bytes() == b"old\n"
    with atomic_output(out) as f:
        f.write(b"new\n")
    assert out.read_bytes() == b"new\n"
    assert [p.name for p in tmp_path.iterdir()] == ["out.jsonl"]  # no .part left


def test_a_symlink_stays_a_link_to_the_file_written(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    real = tmp_path / "data" / "replay.jsonl"
    real.write_bytes(b"old\n")
    link = tmp_path / "latest.jsonl"
    link.symlink_to(real)
    with atomic_output(link) as f:
        f.write(b"new\n")
    assert link.is_symlink()
    assert real.read_bytes() == b"new\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "latest.jsonl"]


def test_a_fifo_is_written_through_not_replaced(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # so opening it to write won't wait
    got: list[bytes] = []
    try:
        with atomic_output(fifo) as f:
            f.write(b"through the pipe\n")
        got.append(os.read(reader, 100))
    finally:
        os.close(reader)
    assert stat.S_ISFIFO(os.stat(fifo).st_mode), "the FIFO was replaced by a regular file"
    assert got == [b"through the pipe\n"]
    assert [p.name for p in tmp_path.iterdir()] == ["pipe"]


def test_a_temporary_file_that_cannot_be_made_is_reported_with_the_name_given(
    tmp_path: Path,
) -> None:
    link = tmp_path / "out.jsonl"
    link.symlink_to(tmp_path / "gone" / "out.jsonl")  # its directory does not exist
    with pytest.raises(OSError) as exc, atomic_output(link) as f:
        f.write(b"x")
    assert exc.value.filename == str(link)  # not the ".out.jsonl.<pid>.part" never named


def test_an_empty_output_name_is_a_usage_error() -> None:
    @click.command()
    @click.option("--out", type=click.Path(dir_okay=False, path_type=Path), callback=output_file)
    def cmd(out: Path | None) -> None:
        click.echo(f"wrote {out}")

    res = CliRunner().invoke(cmd, ["--out", ""])
    assert res.exit_code == 2, res.output
    assert "'--out': an empty name (or '.') is a directory: name a file" in res.output


def test_writing_through_a_fifo_does_not_wait_for_the_command(tmp_path: Path) -> None:
    # the reader is a process of its own (`cat fifo`): the write ends when it has read
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_bytes()), daemon=True)
    reader.start()
    with atomic_output(fifo) as f:
        f.write(b"line\n")
    reader.join(timeout=10)
    assert got == [b"line\n"]
