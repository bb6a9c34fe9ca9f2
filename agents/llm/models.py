"""Logical models: which model each provider of a request's chain is sent.

A request names a model in one of three ways (`LLMConfig.model`):

* an **alias** declared in the providers file (``aliases: [fast, smart]``): every
  provider of the chain is sent its own model for it (its ``models: {fast: ...}``); a
  provider that maps none is skipped. The default alias (``default_alias``) is also
  served by a provider's own default ``model`` when its ``models`` name none for it;
* ``provider/model`` (LiteLLM's spelling, split at the first ``/``; the prefix must be a
  declared provider): that provider is sent ``model`` as is, the other providers of the
  chain are skipped. With no `provider` on the request, the named one heads the chain;
* nothing (None): the default alias, or — with none — each provider's default ``model``.

A providers file without ``aliases`` keeps the names as they are: every provider of the
chain is sent the request's model unchanged (no alias, no ``provider/`` parsing, since
names like ``openai/gpt-4o`` are real model ids of OpenRouter and LiteLLM proxies).

Pure functions and values only: the processor asks `route` which provider gets which
model, and records a skipped attempt for each provider that gets none.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

#: longest alias (LLMConfig.model's limit)
MAX_NAME = 256


class ModelsError(ValueError):
    """The providers file's aliases and per-provider models do not fit together."""


@dataclass(frozen=True)
class ModelCatalog:
    """The aliases and, per declared provider, its model for each alias and its default."""

    #: declared providers (every name a request may use as `provider/...`)
    providers: frozenset[str] = frozenset()
    #: logical model names; empty: names pass through unchanged
    aliases: frozenset[str] = frozenset()
    default_alias: str | None = None
    #: provider → {alias → the provider's model}
    mappings: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    #: provider → its default model (absent: none)
    defaults: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def build(
        cls,
        *,
        providers: Mapping[str, tuple[Mapping[str, str], str]],
        aliases: Iterable[str] = (),
        default_alias: str | None = None,
    ) -> ModelCatalog:
        """Check and assemble: `providers` is name → (its alias map, its default model or
        ""). Raises `ModelsError` naming the first problem (one line)."""
        names = list(aliases)
        for alias in names:
            if not isinstance(alias, str) or not alias.strip():
                raise ModelsError(f"aliases: {alias!r} is not a name")
            if alias != alias.strip():
                raise ModelsError(f"aliases: {alias!r} has spaces around it")
            if len(alias) > MAX_NAME:
                raise ModelsError(f"aliases: {alias[:40]!r}… is longer than {MAX_NAME}")
            if names.count(alias) > 1:
                raise ModelsError(f"aliases: {alias!r} is declared twice")
            prefix, sep, _ = alias.partition("/")
            if sep and prefix in providers:
                raise ModelsError(
                    f"aliases: {alias!r} reads as provider {prefix!r}'s own model; "
                    "choose an alias without that prefix"
                )
        declared = frozenset(names)
        if declared:
            for provider in providers:
                if "/" in provider:
                    raise ModelsError(
                        f"provider {provider!r}: with aliases, a provider's name has no '/' "
                        "(requests name its models as provider/model)"
                    )
        if default_alias is not None and default_alias not in declared:
            raise ModelsError(
                f"default_alias: {default_alias!r} is not one of the aliases"
                + _did_you_mean(default_alias, declared)
            )
        for provider, (mapping, _) in providers.items():
            if mapping and not declared:
                raise ModelsError(
                    f"provider {provider!r} maps models, but no aliases are declared "
                    "(add a top-level `aliases:` list)"
                )
            for alias in mapping:
                if alias not in declared:
                    raise ModelsError(
                        f"provider {provider!r} maps {alias!r}, which is not one of the "
                        f"aliases{_did_you_mean(alias, declared)}"
                    )
        catalog = cls(
            providers=frozenset(providers),
            aliases=declared,
            default_alias=default_alias,
            mappings={p: dict(m) for p, (m, _) in providers.items() if m},
            defaults={p: d for p, (_, d) in providers.items() if d},
        )
        for alias in names:
            if not any(catalog.serves(p, alias) for p in providers):
                raise ModelsError(
                    f"alias {alias!r} is served by no provider: map it in some provider's `models`"
                )
        return catalog

    def serves(self, provider: str, alias: str) -> str | None:
        """The provider's model for `alias`, or None."""
        mapped = self.mappings.get(provider, {}).get(alias)
        if mapped:
            return mapped
        if alias == self.default_alias:
            return self.defaults.get(provider)
        return None


@dataclass(frozen=True, slots=True)
class Hop:
    """One provider of a request's chain: the model it is sent, or why it is skipped."""

    provider: str
    model: str = ""
    #: non-empty: the provider is not called, for this reason
    skip: str = ""
    #: False: no such provider is declared (a request error, not a model mismatch)
    known: bool = True


@dataclass(frozen=True, slots=True)
class Route:
    hops: tuple[Hop, ...]
    #: the logical model asked for ("" for `provider/model` or pass-through names)
    alias: str = ""

    @property
    def head(self) -> str:
        return self.hops[0].provider

    @property
    def declared_head(self) -> str:
        """The first provider of the chain the operator declared, "" when none is: what a
        response names when no provider was called (never a name the request made up)."""
        return next((h.provider for h in self.hops if h.known), "")

    def model_of(self, provider: str) -> str:
        return next((h.model for h in self.hops if h.provider == provider), "")


def route(
    catalog: ModelCatalog,
    *,
    model: str | None,
    provider: str | None,
    fallback: Iterable[str],
    default_provider: str,
) -> Route:
    """Which model each provider of the request's chain is sent (see the module doc)."""
    alias = ""
    passthrough = ""
    explicit: tuple[str, str] | None = None
    problem = ""
    if model is None:
        alias = catalog.default_alias or ""
    else:
        name = model.strip()
        if not name:
            problem = "the request's model name is blank"
        elif not catalog.aliases:
            passthrough = name
        elif name in catalog.aliases:
            alias = name
        else:
            prefix, sep, rest = name.partition("/")
            if sep and prefix in catalog.providers:
                if rest.strip():
                    explicit = (prefix, rest.strip())
                else:
                    problem = f"model {name!r} names provider {prefix!r} but no model of it"
            else:
                problem = _unknown(name, catalog)
    head = provider or (explicit[0] if explicit else default_provider)
    chain: list[str] = []
    for name in (head, *fallback):
        if name not in chain:
            chain.append(name)
    hops = []
    for p in chain:
        if p not in catalog.providers:
            hops.append(Hop(p, skip=f"unknown provider {p!r}", known=False))
        elif problem:
            hops.append(Hop(p, skip=problem))
        elif explicit is not None:
            if p == explicit[0]:
                hops.append(Hop(p, explicit[1]))
            else:
                hops.append(Hop(p, skip=f"the request names {explicit[0]!r}'s model"))
        elif passthrough:
            hops.append(Hop(p, passthrough))
        elif alias:
            served = catalog.serves(p, alias)
            hops.append(
                Hop(p, served) if served else Hop(p, skip=f"{p!r} serves no model for {alias!r}")
            )
        else:
            default = catalog.defaults.get(p)
            hops.append(
                Hop(p, default)
                if default
                else Hop(p, skip=f"the request names no model and {p!r} has no default model")
            )
    return Route(tuple(hops), alias)


def _unknown(name: str, catalog: ModelCatalog) -> str:
    hint = _did_you_mean(name, catalog.aliases)
    prefix, sep, _ = name.partition("/")
    if not hint and sep:
        hint = _did_you_mean(prefix, catalog.providers, "provider ")
    return f"unknown model {name!r}: not an alias nor provider/model{hint}"


def _did_you_mean(name: str, known: Iterable[str], what: str = "") -> str:
    by_case = [k for k in known if k.casefold() == name.strip().casefold()]
    close = by_case or difflib.get_close_matches(name.strip(), sorted(known), n=1)
    return f" (did you mean {what}{close[0]!r}?)" if close else ""
