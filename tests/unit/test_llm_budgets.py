"""LLM budgets: the providers file's prices and budgets, windows, costs, which budget
counts a call, and when a request is refused (`streams.llm_budgets`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from agentstream.agents.llm.registry import read_providers_file
from agentstream.streams import llm_budgets as b
from agentstream.streams.settings import SettingsError

PROVIDERS = {"openai", "local"}


def config(**data: Any) -> b.BudgetConfig:
    return b.parse(data, PROVIDERS)


def charge(agent: str = "a1", provider: str = "openai", model: str = "gpt-4o", **kw: Any) -> Any:
    fields = {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15, "at": 7200}
    return b.Charge(agent=agent, provider=provider, models=(model,), **{**fields, **kw})


def test_windows_named_and_in_seconds() -> None:
    assert b.parse_window("1h") == 3600 and b.parse_window("1d") == 86400
    assert b.parse_window("30d") == 30 * 86400
    assert b.parse_window(120) == 120 and b.parse_window("90s") == 90
    for bad in ("2h", -5, 0, 59, True, None, "1.5h", 3.5):
        with pytest.raises(b.BudgetError):
            b.parse_window(bad)


def test_window_boundaries_are_epoch_aligned() -> None:
    assert b.window_start(3599.999, 3600) == 0
    assert b.window_start(3600, 3600) == 3600  # the boundary opens the next window
    assert b.window_start(86400 * 3 + 5, 86400) == 86400 * 3
    cfg = config(budgets=[{"agent": "a1", "window": "1h", "max_tokens": 20}])
    inc = b.spend_increments(
        cfg, [(0, charge(at=3599)), (0, charge(at=3600)), (0, charge(at=7199))]
    )
    bid = cfg.budgets[0].id
    assert inc[f"0|{bid}|0|a1"] == {"requests": 1, "tokens": 15, "unpriced": 1, "until": 3600}
    assert inc[f"0|{bid}|3600|a1"]["requests"] == 2
    assert inc[f"0|{bid}|3600|a1"]["until"] == 7200


def test_cost_from_prices_in_nano_dollars() -> None:
    price = b.Price(input=0.15, output=0.60)
    # 1M prompt tokens cost $0.15; 1M completion tokens $0.60
    assert b.cost_nusd(price, 1_000_000, 0) == 150_000_000
    assert b.cost_nusd(price, 0, 1_000_000) == 600_000_000
    assert b.cost_nusd(price, 1000, 500) == 150_000 + 300_000
    assert b.cost_nusd(price, -10, -1) == 0  # hostile counts cost nothing, never credit
    assert b.cost_nusd(None, 1000, 500) is None  # no price: unknown, not free


def test_star_budget_is_each_agents_own_and_an_agents_own_replaces_it() -> None:
    cfg = config(
        budgets=[
            {"agent": "*", "window": "1h", "max_tokens": 100},
            {"agent": "vip", "window": "1h", "max_tokens": 1000},
            {"agent": "*", "provider": "openai", "window": "1h", "max_tokens": 50},
            {
                "agent": "*",
                "provider": "openai",
                "model": "gpt-4o",
                "window": "1d",
                "max_tokens": 9,
            },
        ]
    )
    star, vip, prov, model = cfg.budgets
    assert cfg.applicable("a1", "openai", ("gpt-4o",)) == [star, prov, model]
    # vip's own budget takes the place of the default in its scope, the narrower ones stay
    assert cfg.applicable("vip", "openai", ("gpt-4o",)) == [vip, prov, model]
    assert cfg.applicable("a1", "local", ("local-echo",)) == [star]
    assert cfg.applicable("a1", "openai", ("gpt-4o-mini",)) == [star, prov]
    # every agent counts in its own entry of a `*` budget
    inc = b.spend_increments(cfg, [(1, charge("a1")), (1, charge("a2"))])
    assert f"1|{star.id}|7200|a1" in inc and f"1|{star.id}|7200|a2" in inc


def spend_table(cfg: b.BudgetConfig, charges: list[Any]) -> dict[str, Any]:
    state: dict[str, Any] = {}
    b.add_spend(state, b.spend_increments(cfg, [(0, c) for c in charges]))
    return state


def lookup(state: dict[str, Any]) -> Any:
    def spend(budget: b.Budget, agent: str, start: int) -> b.Spent:
        return b.spent_of(state.get(b.spend_key(0, budget, start, agent)))

    return spend


def test_refused_once_spend_reaches_the_limit_not_before() -> None:
    cfg = config(budgets=[{"agent": "*", "window": "1h", "max_tokens": 30}])
    state = spend_table(cfg, [charge()])  # 15 of 30
    assert b.over_budget(cfg, lookup(state), "a1", "openai", "gpt-4o", 7300) is None
    state = spend_table(cfg, [charge(), charge()])  # 30 of 30
    denial = b.over_budget(cfg, lookup(state), "a1", "openai", "gpt-4o", 7300)
    assert denial is not None and denial.limit == "tokens"
    assert denial.reason.startswith("budget agent=a1 provider=* model=* window=1h: 30 of 30")
    # another agent has a budget of its own; the next window starts from nothing
    assert b.over_budget(cfg, lookup(state), "a2", "openai", "gpt-4o", 7300) is None
    assert b.over_budget(cfg, lookup(state), "a1", "openai", "gpt-4o", 10800) is None


def test_cost_budget_and_unpriced_models() -> None:
    cfg = config(
        prices={"openai": {"gpt-4o": {"input": 2.5, "output": 10}}},
        budgets=[{"agent": "a1", "window": "1d", "max_cost_usd": 0.0001}],
    )
    one = charge(prompt_tokens=20, completion_tokens=5)  # 50_000 + 50_000 nano-dollars
    state = spend_table(cfg, [one])
    assert b.over_budget(cfg, lookup(state), "a1", "openai", "gpt-4o", 7300) is not None
    # a model without a price: its tokens count, its cost is unknown and not counted —
    # the report says how many such requests the spent cost leaves out
    state = spend_table(cfg, [charge(model="o1")])
    assert b.over_budget(cfg, lookup(state), "a1", "openai", "o1", 7300) is None
    (row,) = b.budget_report(cfg, state.items(), 7300)
    assert row["unpriced_requests"] == 1 and row["spent_cost_usd"] == 0
    assert row["spent_tokens"] == 15


def test_missing_and_hostile_usage() -> None:
    cfg = config(budgets=[{"agent": "*", "window": "1h", "max_tokens": 10}])
    # no usage at all (a failed call): a request, no tokens
    state = spend_table(cfg, [charge(prompt_tokens=0, completion_tokens=0, total_tokens=0)])
    (entry,) = state.values()
    assert entry["requests"] == 1 and entry["tokens"] == 0
    # negative counts never lower the spend
    state = spend_table(
        cfg, [charge(), charge(prompt_tokens=-99, completion_tokens=-9, total_tokens=-999)]
    )
    (entry,) = state.values()
    assert entry["tokens"] == 15
    # total missing, parts given: their sum
    state = spend_table(cfg, [charge(prompt_tokens=4, completion_tokens=3, total_tokens=0)])
    assert next(iter(state.values()))["tokens"] == 7


def test_report_shows_spend_against_limits_per_agent() -> None:
    cfg = config(budgets=[{"agent": "*", "window": "1h", "max_tokens": 20}])
    state = spend_table(cfg, [charge("a1"), charge("a1"), charge("a2")])
    rows = {r["agent"]: r for r in b.budget_report(cfg, state.items(), 7300)}
    assert rows["a1"]["spent_tokens"] == 30 and rows["a1"]["remaining_tokens"] == 0
    assert rows["a1"]["exceeded"] and not rows["a2"]["exceeded"]
    assert rows["a2"]["remaining_tokens"] == 5 and rows["a2"]["window"] == "1h"
    # past the window: nothing spent in the current one
    assert b.budget_report(cfg, state.items(), 10800)[0]["spent_tokens"] == 0


def test_spend_entries_expire_with_their_window() -> None:
    assert b.spend_expired({"until": 3600}, 3600)
    assert not b.spend_expired({"until": 3600}, 3599)
    assert not b.spend_expired({"tokens": 1}, 10**10)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"prices": {"openia": {"m": {"input": 1, "output": 1}}}}, "unknown provider 'openia'"),
        ({"prices": {"openai": {"m": {"input": -1, "output": 1}}}}, "input: -1 is negative"),
        ({"prices": {"openai": {"m": {"input": 1}}}}, "expected {input: USD, output: USD}"),
        ({"budgets": [{"agent": "a", "window": "2h", "max_tokens": 1}]}, "window '2h'"),
        ({"budgets": [{"agent": "a", "window": "1h", "max_tokens": -1}]}, "-1 is negative"),
        ({"budgets": [{"agent": "a", "window": "1h", "max_tokens": 1.5}]}, "not a whole number"),
        ({"budgets": [{"agent": "a", "window": "1h"}]}, "set max_tokens, max_cost_usd or both"),
        ({"budgets": [{"agent": "a", "max_tokens": 1}]}, "window:"),
        ({"budgets": [{"window": "1h", "max_tokens": 1}]}, "agent:"),
        ({"budgets": [{"agent": "a", "window": "1h", "max_tokns": 1}]}, "unknown key 'max_tokns'"),
        (
            {"budgets": [{"agent": "a", "provider": "x", "window": "1h", "max_tokens": 1}]},
            "budgets[0]: unknown provider 'x'",
        ),
        (
            {"budgets": [{"agent": "a", "window": "1h", "max_tokens": 1}] * 2},
            "budgets[1]: a second budget for agent=a",
        ),
        ({"budgets": {"agent": "a"}}, "budgets: expected a list"),
    ],
)
def test_mistakes_are_one_line(data: dict[str, Any], message: str) -> None:
    with pytest.raises(b.BudgetError) as err:
        b.parse(data, PROVIDERS)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_the_providers_file_carries_prices_and_budgets(tmp_path: Path) -> None:
    path = tmp_path / "providers.yaml"
    path.write_text(
        "providers:\n  openai: {kind: openai, base_url: 'http://127.0.0.1:9/v1'}\n"
        "prices:\n  openai: {gpt-4o: {input: 2.5, output: 10}}\n"
        "budgets:\n  - {agent: '*', window: 1d, max_tokens: 1000}\n"
    )
    file = read_providers_file(path)
    assert file.budgets.prices[("openai", "gpt-4o")] == b.Price(2.5, 10.0)
    assert file.budgets.budgets[0].window_s == 86400
    assert b.load(path) == file.budgets  # what the spend table's fold reads
    path.write_text(
        "providers:\n  openai: {kind: openai, base_url: 'http://127.0.0.1:9/v1'}\n"
        "budgets:\n  - {agent: a, window: 1w, max_tokens: 1}\n"
    )
    with pytest.raises(SettingsError, match=r"providers file .*: budgets\[0\]: window '1w'"):
        read_providers_file(path)


def test_the_documented_example_is_a_valid_file(tmp_path: Path) -> None:
    doc = (Path(__file__).resolve().parents[2] / "docs" / "llm.md").read_text()
    section = doc[doc.index("## Budgets") :]
    example = section[section.index("```yaml\n") + 8 : section.index("```\n", 8)]
    path = tmp_path / "providers.yaml"
    path.write_text(example)
    cfg = read_providers_file(path).budgets
    assert cfg.prices[("openai", "gpt-4o")] == b.Price(2.5, 10.0)
    star, planner, planner_cost, gpt4o = cfg.budgets
    # planner's own daily budget replaces the default; the others add to it
    assert cfg.applicable("planner", "openai", ("gpt-4o",)) == [planner, planner_cost, gpt4o]
    assert cfg.applicable("other", "ollama", ("llama3.2",)) == [star]


def test_llm_usage_prints_each_budget_against_its_limits() -> None:
    """`agentstream llm usage` prints the view's budget rows: spent against each limit,
    unpriced requests, and EXCEEDED once requests are refused."""
    from agentstream.agents.llm.cli import budget_lines

    cfg = config(
        prices={"openai": {"gpt-4o": {"input": 2.5, "output": 10}}},
        budgets=[
            {"agent": "*", "window": "1h", "max_tokens": 20},
            {"agent": "a1", "provider": "openai", "window": "1d", "max_cost_usd": 1},
        ],
    )
    state = spend_table(cfg, [charge("a1"), charge("a1"), charge("a2"), charge("a1", model="o1")])
    rows = b.budget_report(cfg, state.items(), 7300)
    lines = budget_lines(rows)
    assert len(lines) == len(rows) == 3
    by_agent = {(ln.split()[1], ln.split()[3]): ln for ln in lines}
    assert by_agent[("a1", "1h")].endswith("tokens=45/20 EXCEEDED")
    assert by_agent[("a2", "1h")].endswith("tokens=15/20 ok")
    daily = by_agent[("a1", "1d")]
    assert "openai/*" in daily and "(+1 unpriced)" in daily and daily.endswith(" ok")
    (cost_row,) = [r for r in rows if r["window"] == "1d"]
    assert cost_row["spent_cost_usd"] > 0
    assert f"cost=${cost_row['spent_cost_usd']:.4f}/$1.0000" in daily
