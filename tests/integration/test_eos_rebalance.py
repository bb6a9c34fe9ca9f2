"""Exactly-once across rebalances: two workers, partitions moving while batches are in
flight. A batch still running when its partitions are revoked used to find no
transaction and send the rest of its outputs through Faust's non-transactional path;
the next owner then processed its inputs again: duplicates for read_committed readers.
Now a revoke lets the batches in progress finish and commits them, and a batch taken
before the revoke that is still running is abandoned with its outputs in the revoked
(never committed) transactions (streams.delivery, invariant 9). A supervisor restarts a
worker that crashes, as one would in production."""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from agentstream.streams.delivery import EOS_COMMIT_WAIT_S
from agentstream.streams.settings import Settings
from tests.conftest import _free_port
from tests.integration.test_recovery_crash import Gauge, input_id, messages, publish, use_env
from tests.support import Worker, await_until, read_topic

pytestmark = [pytest.mark.integration, pytest.mark.xdist_group("fault-injection")]

N = 3000


@contextlib.asynccontextmanager
async def supervised(workers: list[Worker], stopped: set[int]) -> AsyncIterator[list[int]]:
    """Restart a worker that exited by itself (a crash), as a supervisor would; yields
    the exit codes of the crashes. `stopped` holds the ids of the workers the test
    stopped on purpose."""
    crashes: list[int] = []

    async def watch() -> None:
        while True:
            for w in workers:
                code = None if w.proc is None else w.proc.poll()
                if code is not None and id(w) not in stopped:
                    crashes.append(code)
                    w._ready_seen = w.ready_count()
                    await asyncio.to_thread(w.start)
            await asyncio.sleep(0.5)

    task = asyncio.create_task(watch())
    try:
        yield crashes
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


@pytest.mark.parametrize(
    ("batch_s", "n"),
    [
        # batches of ~2 s: a revoke waits for them and commits them
        (2.0, N),
        # batches of 30 s: the second worker joins as one begins, so the revoke's wait
        # (EOS_COMMIT_WAIT_S) runs out and the batch is abandoned; fewer inputs
        (30.0, N // 5),
    ],
)
async def test_exactly_once_two_workers_rebalance_mid_load_no_duplicates_no_loss(
    settings_env: dict[str, str], tmp_path: Path, batch_s: float, n: int
) -> None:
    base = {
        **settings_env,
        "AGENTSTREAM_AGENTS": "security",
        "AGENTSTREAM_SECURITY_ENABLED": "false",
        "AGENTSTREAM_PROCESSING_GUARANTEE": "exactly_once",
        "AGENTSTREAM_TOPIC_PARTITIONS": "4",
        "AGENTSTREAM_CHECKPOINT_INTERVAL_S": "3600",
        "AGENTSTREAM_BROKER_SESSION_TIMEOUT_S": "10",
        # test hook (streams.processing): every batch takes this long to send its outputs,
        # so that batches are in flight whenever the partitions move
        "AGENTSTREAM_TEST_DELAYS": f"send_batch@{batch_s}",
    }
    settings: Settings = use_env(base)
    accepted = settings.topic("agent.messages.accepted")
    first = Worker(base, tmp_path / "w1.log").start()
    second = Worker({**base, "AGENTSTREAM_WEB_PORT": str(_free_port())}, tmp_path / "w2.log")
    stopped = {id(second)}
    try:
        inputs = messages(n)
        await publish(settings, inputs)
        async with (
            supervised([first, second], stopped) as crashes,
            Gauge(settings.bootstrap, accepted) as gauge,
        ):
            # a second member joins while the first is busy: every partition is revoked
            if batch_s > EOS_COMMIT_WAIT_S:
                # as a batch begins: it outlasts the revoke's wait
                await await_until(
                    lambda: "test delay at send_batch" in first.tail(400), 90, 0.1, what="batch"
                )
            else:
                await await_until(lambda: gauge.over(n // 20), 90, interval=0.05, what="outputs")
            await asyncio.to_thread(second.start)
            stopped.discard(id(second))
            # and leaves again while work remains: a second rebalance
            if await gauge.count() < n * 3 // 4:
                await await_until(lambda: gauge.over(n // 2), 180, interval=0.05, what="more")
                stopped.add(id(second))
                second.stop()
            want = {str(e.event_id) for e in inputs}
            got: list[str] = []

            async def complete() -> bool:
                recs = await read_topic(settings.bootstrap, accepted, timeout=10, idle=1.0)
                got[:] = [input_id(ev) for _, ev in recs if ev is not None]
                return set(got) >= want

            try:
                await await_until(complete, 240, interval=1, what="every input forwarded")
            except AssertionError:
                missing = want - set(got)
                raise AssertionError(
                    f"{len(missing)} of {n} inputs not forwarded (read_committed)\n"
                    f"--- w1 ---\n{first.tail(80)}\n--- w2 ---\n{second.tail(80)}"
                ) from None
        dups = {k: c for k, c in Counter(got).items() if c > 1}
        log = (tmp_path / "w1.log").read_text(errors="replace") + (tmp_path / "w2.log").read_text(
            errors="replace"
        )
        assert not dups, (
            f"{sum(dups.values()) - len(dups)} duplicate forwarded message(s) across the "
            f"rebalances ({log.count('no open transaction')} 'no open transaction' warnings)"
        )
        decisions = await read_topic(
            settings.bootstrap, settings.topic("security.decisions"), timeout=10, idle=1.0
        )
        decided = Counter(ev.causation_id for _, ev in decisions if ev is not None)
        assert set(decided) == want
        assert len(decisions) == n, f"{len(decisions) - n} duplicate decision(s)"
        if batch_s > EOS_COMMIT_WAIT_S:
            # the case this parameter is for: a revoke's wait ran out on a batch
            assert "revoke: batches still in progress" in log
        assert not crashes, f"worker crash(es): {crashes}"
    finally:
        second.stop()
        first.stop()
