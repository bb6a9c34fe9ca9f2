"""What `audit verify` and `rebuild` print as text comes from records anyone who can write
the topics chose: it reaches the operator's terminal with every control character made
visible (`term_safe`), never raw (an OSC 52 sequence writes the clipboard)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from agentstream.agents.audit.cli import _print_verify

OSC52 = "\x1b]52;c;cm0gLXJmIH4=\x07"


def test_verify_prints_policy_ids_signers_and_findings_as_visible_text(
    capsys: pytest.CaptureFixture[str],
) -> None:
    finding = SimpleNamespace(kind="forged", offset=7, detail=f"signed by {OSC52}")
    report = SimpleNamespace(
        topic="security.decisions",
        partition=0,
        records=3,
        signed=1,
        findings=[finding],
        anchored=True,
        lost=[],
    )
    result = {
        "counts": {"ok": 2, "forged": 1},
        "records": 3,
        "partitions": 1,
        "lost": [],
        "trusted_keys": [],
        "require_signatures": False,
        "policy_versions": [
            {
                "policy_id": f"p{OSC52}",
                "version": 1,
                "signed_by": f"admin{OSC52}",
                "decisions": 2,
                "on_topic": True,
                "signature_valid": True,
            }
        ],
    }
    _print_verify([report], result, SimpleNamespace(source="pinned", problem=None))
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\x07" not in out
    assert "\\x1b]52;c;" in out  # shown, not hidden
