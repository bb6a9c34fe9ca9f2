"""The dedup and cancellation tables keep an entry for AGENTSTREAM_LLM_DEDUP_RETENTION_S
after its event time, then the owning worker deletes it (a changelog tombstone), and a
rebuild still equals the live table. Without this both tables grow with every request."""

from __future__ import annotations

from pathlib import Path

import pytest

from agentstream.agents.audit.rebuild import read_changelog
from agentstream.schemas import Event
from agentstream.schemas.llm import LLMCancelRequested
from tests.integration.test_llm_flow import req, start_llm_worker, view
from tests.support import assert_rebuild_equal, await_until

pytestmark = pytest.mark.integration

RETENTION_S = 6


async def test_dedup_entries_expire_after_the_retention(
    settings_env: dict[str, str], tmp_path: Path
) -> None:
    env = {
        **settings_env,
        "AGENTSTREAM_AGENTS": "llm",
        "AGENTSTREAM_LLM_DEDUP_RETENTION_S": str(RETENTION_S),
    }
    audit_env = {**env, "AGENTSTREAM_AGENTS": "audit"}
    settings, _port, topics, worker, client = await start_llm_worker(env, tmp_path)
    try:
        k1 = req("k1", "local")
        await client.publish("llm.requests", k1)
        assert (await topics.response("k1")).status == "completed"
        await client.publish(
            "llm.cancellations", Event.of(LLMCancelRequested(request_id="k2"), source="test")
        )
        entry = await await_until(
            lambda: view(env, "/llm/requests/k1")["final"], 20, what="k1 dedup entry"
        )
        assert entry["status"] == "completed" and isinstance(entry["at"], int)
        await await_until(
            lambda: view(env, "/llm/requests/k2")["cancelled"], 20, what="k2 cancellation"
        )

        # within the retention: a redelivery is not called again
        before = view(env, "/llm/requests/k1")["deduplicated_total"]
        await client.publish("llm.requests", k1)
        await await_until(
            lambda: view(env, "/llm/requests/k1")["deduplicated_total"] > before,
            RETENTION_S - 1,
            what="k1 deduplicated within the retention",
        )
        assert len(topics.responses("k1")) == 1

        # past it: both entries deleted, in the live table and in the changelog
        def both_gone() -> bool:
            return (
                view(env, "/llm/requests/k1")["final"] is None
                and view(env, "/llm/requests/k2")["cancelled"] is None
            )

        await await_until(both_gone, RETENTION_S + 20, interval=0.2, what="entries expired")
        done = await read_changelog(settings, "llm_responses_done")
        cancelled = await read_changelog(settings, "llm_cancelled")
        assert "k1" not in done and "k2" not in cancelled
        # the rebuild folds k1 and k2 back in, dated; the comparison lets go of them too
        assert_rebuild_equal(audit_env, "llm_responses_done")
        assert_rebuild_equal(audit_env, "llm_cancelled")

        # the same request id after the retention is a new call, as documented
        await client.publish("llm.requests", k1)
        await await_until(lambda: len(topics.responses("k1")) == 2, 30, what="k1 answered again")
    finally:
        await topics.stop()
        await client.stop()
        worker.stop()
