"""The demo's last summary waits for the outputs of every input sent (`caught_up`)."""

from __future__ import annotations

from collections import Counter

from agentstream.streams.cli.demo import caught_up

SENT = Counter({"messages": 10, "undecodable": 2, "llm requests": 3, "metrics": 40})
ALL = Counter(
    {"accepted": 7, "rejected": 3, "decisions": 10, "dead letters": 2, "llm responses": 3}
)


def test_caught_up_once_every_input_has_its_outputs() -> None:
    assert caught_up(SENT, ALL)
    # at-least-once may show an output twice: still caught up
    assert caught_up(SENT, ALL + Counter({"accepted": 1, "decisions": 1}))


def test_not_caught_up_while_any_output_is_missing() -> None:
    for name in ("accepted", "decisions", "dead letters", "llm responses"):
        short = ALL.copy()
        short[name] -= 1
        assert not caught_up(SENT, short), name
