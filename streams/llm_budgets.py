"""LLM budgets: token and cost limits per agent (and optionally per provider / model) per
time window, with the prices that turn tokens into US dollars. Pure values and functions:
the providers file's `prices` and `budgets` parsed and checked (`parse`), what a final
response adds to which budget (`spend_increments`), and whether a request may still be
sent to a provider (`over_budget`).

    prices:
      openai: {gpt-4o-mini: {input: 0.15, output: 0.60}}     # USD per 1M tokens
    budgets:
      - {agent: "*", window: 1d, max_tokens: 200000}         # every agent, each its own
      - {agent: planner, window: 30d, max_cost_usd: 25}
      - {agent: planner, provider: openai, model: gpt-4o, window: 1h, max_tokens: 50000}

Windows are tumbling and aligned to the epoch (``1h`` starts on the hour, ``1d`` at
00:00 UTC, ``30d`` every 30 days from 1970-01-01, seconds: every N seconds). A response
counts in the window of its event time. Costs are integers of nano-dollars, so sums are
exact and a rebuild from history equals the live table whatever the batching.

Here because both the LLM stage (agents) and the spend table's fold (streams.tables,
which `agentstream rebuild` replays without the agents) need it.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field
from functools import cache
from typing import Any

#: named windows; any other is a whole number of seconds (at least MIN_WINDOW_S)
WINDOWS = {"1h": 3600, "1d": 86400, "30d": 30 * 86400}
MIN_WINDOW_S = 60
#: nano-dollars per dollar: costs are kept as integers of these
NANO = 1_000_000_000
BUDGET_KEYS = ("agent", "provider", "model", "window", "max_tokens", "max_cost_usd")
_SECONDS = re.compile(r"(\d+)s?")


class BudgetError(ValueError):
    """The providers file's `prices` or `budgets` are wrong (one line, naming the entry)."""


@dataclass(frozen=True, slots=True)
class Price:
    """USD per one million tokens."""

    input: float
    output: float


@dataclass(frozen=True, slots=True)
class Budget:
    #: an agent id, or "*": every agent has a budget of its own of this size
    agent: str
    window_s: int
    provider: str | None = None
    model: str | None = None
    max_tokens: int | None = None
    max_cost_usd: float | None = None

    @property
    def id(self) -> str:
        """Names the budget's spend entries; the limits are not part of it, so raising a
        limit keeps what was spent."""
        raw = "\0".join((self.agent, self.provider or "", self.model or "", str(self.window_s)))
        return hashlib.sha256(raw.encode()).hexdigest()[:16]

    @property
    def window(self) -> str:
        return window_label(self.window_s)

    def label(self, agent: str | None = None) -> str:
        """e.g. ``agent=planner provider=openai model=* window=1h``."""
        return (
            f"agent={agent or self.agent} provider={self.provider or '*'} "
            f"model={self.model or '*'} window={self.window}"
        )

    def scope(self) -> tuple[str | None, str | None, int]:
        return (self.provider, self.model, self.window_s)

    def applies(self, agent: str, provider: str, models: Collection[str]) -> bool:
        return (
            self.agent in ("*", agent)
            and (self.provider is None or self.provider == provider)
            and (self.model is None or self.model in models)
        )


@dataclass(frozen=True)
class BudgetConfig:
    #: (provider, model) → price
    prices: Mapping[tuple[str, str], Price] = field(default_factory=dict)
    budgets: tuple[Budget, ...] = ()

    def price(self, provider: str, models: Iterable[str]) -> Price | None:
        for m in models:
            p = self.prices.get((provider, m))
            if p is not None:
                return p
        return None

    def applicable(self, agent: str, provider: str, models: Collection[str]) -> list[Budget]:
        """The budgets that count a call of `agent` to `provider` (with one of `models`):
        for each scope (provider, model, window), the agent's own budget when it has one,
        else the ``*`` one — an agent's own budget replaces the default, narrower scopes
        (a provider's, a model's) add to the wider ones."""
        chosen: dict[tuple[str | None, str | None, int], Budget] = {}
        for b in self.budgets:
            if not b.applies(agent, provider, models):
                continue
            cur = chosen.get(b.scope())
            if cur is None or (cur.agent == "*" and b.agent != "*"):
                chosen[b.scope()] = b
        return list(chosen.values())


def window_label(window_s: int) -> str:
    return next((k for k, v in WINDOWS.items() if v == window_s), f"{window_s}s")


def parse_window(value: Any) -> int:
    if isinstance(value, bool):
        raise BudgetError(f"window {value!r}: 1h, 1d, 30d or a number of seconds")
    if isinstance(value, int):
        seconds = value
    elif isinstance(value, str) and value.strip() in WINDOWS:
        return WINDOWS[value.strip()]
    elif isinstance(value, str) and (m := _SECONDS.fullmatch(value.strip())):
        seconds = int(m.group(1))
    else:
        raise BudgetError(f"window {value!r}: 1h, 1d, 30d or a number of seconds")
    if seconds < MIN_WINDOW_S:
        raise BudgetError(f"window {value!r}: at least {MIN_WINDOW_S} seconds")
    return seconds


def window_start(at: float, window_s: int) -> int:
    """Start (epoch seconds) of the window holding time `at`."""
    return int(at // window_s) * window_s


def _number(where: str, value: Any, *, integer: bool = False) -> float:
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    if not ok or (integer and not isinstance(value, int)) or not math.isfinite(value):
        kind = "a whole number" if integer else "a number"
        raise BudgetError(f"{where}: {value!r} is not {kind}")
    if value < 0:
        raise BudgetError(f"{where}: {value!r} is negative")
    return float(value)


def parse(data: Mapping[str, Any], providers: Collection[str]) -> BudgetConfig:
    """The `prices` and `budgets` of a providers file's top level, checked against the
    declared `providers`. Raises `BudgetError` naming the first problem."""
    prices: dict[tuple[str, str], Price] = {}
    raw_prices = data.get("prices") or {}
    if not isinstance(raw_prices, dict):
        raise BudgetError("prices: expected a mapping provider → {model: {input, output}}")
    for provider, models in raw_prices.items():
        if provider not in providers:
            raise BudgetError(f"prices: unknown provider {provider!r}")
        if not isinstance(models, dict) or not models:
            raise BudgetError(f"prices.{provider}: expected a mapping model → {{input, output}}")
        for model, price in models.items():
            where = f"prices.{provider}.{model}"
            if not isinstance(price, dict) or set(price) != {"input", "output"}:
                raise BudgetError(f"{where}: expected {{input: USD, output: USD}} per 1M tokens")
            prices[(str(provider), str(model))] = Price(
                _number(f"{where}.input", price["input"]),
                _number(f"{where}.output", price["output"]),
            )
    raw_budgets = data.get("budgets") or []
    if not isinstance(raw_budgets, list):
        raise BudgetError("budgets: expected a list")
    budgets: list[Budget] = []
    for i, entry in enumerate(raw_budgets):
        where = f"budgets[{i}]"
        if not isinstance(entry, dict):
            raise BudgetError(f"{where}: expected a mapping")
        unknown = [k for k in entry if k not in BUDGET_KEYS]
        if unknown:
            raise BudgetError(
                f"{where}: unknown key {unknown[0]!r} (known: {', '.join(BUDGET_KEYS)})"
            )
        agent = entry.get("agent")
        if not isinstance(agent, str) or not agent.strip():
            raise BudgetError(f'{where}: agent: an agent id or "*"')
        provider = entry.get("provider")
        if provider is not None and provider not in providers:
            raise BudgetError(f"{where}: unknown provider {provider!r}")
        model = entry.get("model")
        if model is not None and (not isinstance(model, str) or not model.strip()):
            raise BudgetError(f"{where}: model: a model name")
        if "window" not in entry:
            raise BudgetError(f"{where}: window: 1h, 1d, 30d or a number of seconds")
        try:
            window_s = parse_window(entry["window"])
        except BudgetError as exc:
            raise BudgetError(f"{where}: {exc}") from None
        max_tokens = entry.get("max_tokens")
        if max_tokens is not None:
            max_tokens = int(_number(f"{where}.max_tokens", max_tokens, integer=True))
        max_cost = entry.get("max_cost_usd")
        if max_cost is not None:
            max_cost = _number(f"{where}.max_cost_usd", max_cost)
        if max_tokens is None and max_cost is None:
            raise BudgetError(f"{where}: set max_tokens, max_cost_usd or both")
        budget = Budget(
            agent=agent,
            window_s=window_s,
            provider=provider,
            model=model,
            max_tokens=max_tokens,
            max_cost_usd=max_cost,
        )
        if any(b.id == budget.id for b in budgets):
            raise BudgetError(f"{where}: a second budget for {budget.label()}")
        budgets.append(budget)
    return BudgetConfig(prices=prices, budgets=tuple(budgets))


# -- spend -----------------------------------------------------------------------------


def cost_nusd(price: Price | None, prompt_tokens: int, completion_tokens: int) -> int | None:
    """Cost in nano-dollars (None: no price, cost unknown). Negative counts count as 0."""
    if price is None:
        return None
    prompt, completion = max(0, prompt_tokens), max(0, completion_tokens)
    # USD per 1M tokens = 1000 nano-dollars per token
    return round(prompt * price.input * 1000 + completion * price.output * 1000)


def spend_key(partition: int, budget: Budget, start: int, agent: str) -> str:
    """``<partition>|<budget id>|<window start>|<agent>`` — the agent last: agent ids
    may hold ``|``, the other parts never do."""
    return f"{partition}|{budget.id}|{start}|{agent}"


def parse_spend_key(key: str) -> tuple[int, str, int, str] | None:
    parts = str(key).split("|", 3)
    if len(parts) != 4 or not parts[0].isdigit() or not parts[2].isdigit():
        return None
    return int(parts[0]), parts[1], int(parts[2]), parts[3]


@dataclass(frozen=True, slots=True)
class Charge:
    """What one final response costs: its tokens, and its cost when priced."""

    agent: str
    provider: str
    #: the models it may be named by: the one sent (as the providers file names it)
    #: and the one the provider answered with
    models: tuple[str, ...]
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    #: epoch seconds of the response's event time
    at: int


def spend_increments(
    config: BudgetConfig, charges: Iterable[tuple[int, Charge]]
) -> dict[str, dict[str, int]]:
    """{spend key: increments} of (partition, charge) pairs, summed per key. `until` is
    the end of the entry's window (what the retention reads)."""
    out: dict[str, dict[str, int]] = {}
    for partition, c in charges:
        tokens = max(0, c.total_tokens) or max(0, c.prompt_tokens) + max(0, c.completion_tokens)
        cost = cost_nusd(config.price(c.provider, c.models), c.prompt_tokens, c.completion_tokens)
        for b in config.applicable(c.agent, c.provider, c.models):
            start = window_start(c.at, b.window_s)
            inc = out.setdefault(spend_key(partition, b, start, c.agent), {})
            inc["requests"] = inc.get("requests", 0) + 1
            inc["tokens"] = inc.get("tokens", 0) + tokens
            if cost is None:
                inc["unpriced"] = inc.get("unpriced", 0) + 1
            else:
                inc["cost_nusd"] = inc.get("cost_nusd", 0) + cost
            inc["until"] = start + b.window_s
    return out


def add_spend(state: Any, increments: Mapping[str, Mapping[str, int]]) -> None:
    """Add increments to the entries: one write per key."""
    for key, inc in increments.items():
        cur = dict(state.get(key) or {})
        for f, v in inc.items():
            cur[f] = v if f == "until" else int(cur.get(f, 0)) + v
        state[key] = cur


def spend_expired(value: Any, now: float) -> bool:
    """An entry whose window has ended (one without `until` is not ours to judge)."""
    until = value.get("until") if isinstance(value, dict) else None
    return isinstance(until, int | float) and until <= now


# -- enforcement -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Spent:
    tokens: int = 0
    cost_nusd: int = 0
    requests: int = 0
    unpriced: int = 0

    def __add__(self, other: Spent) -> Spent:
        return Spent(
            self.tokens + other.tokens,
            self.cost_nusd + other.cost_nusd,
            self.requests + other.requests,
            self.unpriced + other.unpriced,
        )


def spent_of(value: Any) -> Spent:
    v = value if isinstance(value, dict) else {}
    return Spent(
        int(v.get("tokens", 0)),
        int(v.get("cost_nusd", 0)),
        int(v.get("requests", 0)),
        int(v.get("unpriced", 0)),
    )


@dataclass(frozen=True, slots=True)
class Denial:
    budget: Budget
    agent: str
    #: "tokens" or "cost": which limit is reached
    limit: str
    reason: str


def exhausted(budget: Budget, spent: Spent) -> str | None:
    """Which of the budget's limits the spend has reached ("tokens", "cost") or None.
    Reached means spent ≥ limit: a request is refused only once the window's spend is at
    the limit, so the calls in flight then can go past it by their own usage."""
    if budget.max_tokens is not None and spent.tokens >= budget.max_tokens:
        return "tokens"
    if budget.max_cost_usd is not None and spent.cost_nusd >= round(budget.max_cost_usd * NANO):
        return "cost"
    return None


def over_budget(
    config: BudgetConfig,
    spend: Callable[[Budget, str, int], Spent],
    agent: str,
    provider: str,
    model: str,
    now: float,
) -> Denial | None:
    """The first budget a call of `agent` to `provider`'s `model` would be refused by at
    epoch time `now`, given `spend(budget, agent, window start)` — or None."""
    for b in config.applicable(agent, provider, (model,)):
        start = window_start(now, b.window_s)
        spent = spend(b, agent, start)
        limit = exhausted(b, spent)
        if limit is None:
            continue
        if limit == "tokens":
            detail = f"{spent.tokens} of {b.max_tokens} tokens spent"
        else:
            detail = f"${spent.cost_nusd / NANO:.4f} of ${b.max_cost_usd:g} spent"
        until = start + b.window_s
        return Denial(
            b,
            agent,
            limit,
            f"budget {b.label(agent)}: {detail} in the window ending at epoch {until}",
        )
    return None


def budget_report(
    config: BudgetConfig, spend_items: Iterable[tuple[str, Any]], now: float
) -> list[dict[str, Any]]:
    """Each budget (per agent, for ``*`` ones: each agent with spend in the current
    window) with its spend against its limits, from spend entries summed over partitions."""
    totals: dict[tuple[str, int, str], Spent] = {}
    for key, value in spend_items:
        parsed = parse_spend_key(key)
        if parsed is None:
            continue
        _, bid, start, agent = parsed
        k = (bid, start, agent)
        totals[k] = totals.get(k, Spent()) + spent_of(value)
    rows = []
    for b in config.budgets:
        start = window_start(now, b.window_s)
        agents = sorted(a for (bid, s, a) in totals if bid == b.id and s == start)
        if b.agent != "*":
            agents = [b.agent]
        for agent in agents or [b.agent]:
            spent = totals.get((b.id, start, agent), Spent())
            row: dict[str, Any] = {
                "agent": agent,
                "budget_agent": b.agent,
                "provider": b.provider or "*",
                "model": b.model or "*",
                "window": b.window,
                "window_start": start,
                "window_end": start + b.window_s,
                "requests": spent.requests,
                "spent_tokens": spent.tokens,
                "spent_cost_usd": spent.cost_nusd / NANO,
                "unpriced_requests": spent.unpriced,
                "max_tokens": b.max_tokens,
                "max_cost_usd": b.max_cost_usd,
                "remaining_tokens": (
                    max(0, b.max_tokens - spent.tokens) if b.max_tokens is not None else None
                ),
                "remaining_cost_usd": (
                    max(0.0, b.max_cost_usd - spent.cost_nusd / NANO)
                    if b.max_cost_usd is not None
                    else None
                ),
                "exceeded": exhausted(b, spent) is not None,
            }
            rows.append(row)
    return rows


# -- the configuration of this process -------------------------------------------------


def read_file(path: Any) -> dict[str, Any]:
    """A providers file's content, unchecked ({} when it is not a mapping): its checks
    are the registry's (`agents.llm.registry.read_providers_file`), which a worker runs
    first."""
    import json
    from pathlib import Path

    import yaml

    p = Path(path)
    text = p.read_text()
    data = json.loads(text) if p.suffix == ".json" else yaml.safe_load(text)
    return data if isinstance(data, dict) else {}


def load(path: Any) -> BudgetConfig:
    """`prices` and `budgets` of a providers file (its providers' own checks are the
    registry's, `agents.llm.registry.read_providers_file`)."""
    data = read_file(path)
    if not data:
        return BudgetConfig()
    providers = {str(k) for k in (data.get("providers") or {})} | {"local"}
    return parse(data, providers)


@cache
def configured() -> BudgetConfig:
    """The budgets of `AGENTSTREAM_LLM_PROVIDERS_FILE` (none without one)."""
    from agentstream.streams.settings import get_settings

    path = get_settings().llm_providers_file
    return load(path) if path is not None else BudgetConfig()
