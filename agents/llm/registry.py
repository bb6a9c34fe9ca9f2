"""LLMRegistry: provider name → configured, lazily initialised provider.

Providers are declared in a YAML or JSON file (`AGENTSTREAM_LLM_PROVIDERS_FILE`)::

    providers:
      openai:   {kind: openai, base_url: "https://api.openai.com/v1", requires_key: true}
      azure:    {kind: azure, base_url: "https://res.openai.azure.com",
                 deployment: gpt4o, api_version: "2024-06-01", requires_key: true}
      vllm:     {kind: vllm, base_url: "http://127.0.0.1:8000/v1"}
      ollama:   {kind: ollama, base_url: "http://127.0.0.1:11434"}
      claude:   {kind: anthropic, base_url: "https://api.anthropic.com", requires_key: true}

`local` (the deterministic offline provider) is always registered. Keys are never in
the file: a provider with `requires_key: true` reads `llm.<name>.api_key` from the OS
keychain through `streams.credentials.KeychainCredentialsProvider`.

Logical models (`agents/llm/models.py`): top-level `aliases` (the model names requests
use) and `default_alias`, and per provider `models` (alias → its own model) and `model`
(its default)::

    aliases: [fast, smart]
    default_alias: fast
    providers:
      openai: {kind: openai, base_url: ..., models: {fast: gpt-4o-mini, smart: gpt-4o}}
      ollama: {kind: ollama, base_url: ..., model: llama3.2}   # serves the default alias

The file has no version: these keys are optional, and a file without `aliases` sends
every provider the request's model as it is, as before they existed.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from agentstream.agents.llm.models import ModelCatalog, ModelsError
from agentstream.agents.llm.providers._http import HTTPProvider
from agentstream.agents.llm.providers.anthropic import AnthropicProvider
from agentstream.agents.llm.providers.base import (
    LOCAL_MODEL,
    LLMProvider,
    ProviderConfig,
    SecretSource,
)
from agentstream.agents.llm.providers.local import LocalProvider
from agentstream.agents.llm.providers.ollama import OllamaProvider
from agentstream.agents.llm.providers.openai import OpenAICompatibleProvider
from agentstream.streams import llm_budgets
from agentstream.streams.documents import MAX_NESTING, too_deep
from agentstream.streams.errors import ProviderRequestError
from agentstream.streams.llm_budgets import BudgetConfig
from agentstream.streams.settings import Settings, SettingsError

log = logging.getLogger(__name__)

LOCAL = "local"


async def keychain_secret(name: str) -> str | None:
    """A secret from the OS keychain (the credentials provider of the security domain)."""
    from agentstream.streams.credentials import KeychainCredentialsProvider
    from agentstream.streams.errors import CredentialsNotFound

    try:
        value = await KeychainCredentialsProvider().get_secret(name)
    except CredentialsNotFound:
        return None
    return str(value) if value else None


#: top-level keys of the providers file; others are refused (a misspelt `aliases` would
#: otherwise be ignored and every provider sent the same name), except `x-...` keys,
#: the usual place for YAML anchors (as in compose files)
FILE_KEYS = ("providers", "aliases", "default_alias", "prices", "budgets")


@dataclass(frozen=True)
class ProvidersFile:
    providers: list[ProviderConfig]
    aliases: list[str] = field(default_factory=list)
    default_alias: str | None = None
    #: prices and budgets (`streams.llm_budgets`; docs/llm.md, "Budgets")
    budgets: BudgetConfig = field(default_factory=BudgetConfig)


def read_providers_file(path: Path) -> ProvidersFile:
    """The providers file, checked: every mistake is a `SettingsError` of one line naming
    the file."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise SettingsError(f"cannot read providers file {path}: {exc}") from None
    except UnicodeDecodeError as exc:  # a binary file: a traceback, before
        raise SettingsError(
            f"providers file {path} is not valid YAML/JSON: not UTF-8 (byte {exc.start})"
        ) from None
    try:
        # checked first: building a deeper one exhausted the stack (a RecursionError
        # traceback, or an unnamed "maximum recursion depth" warning)
        line = too_deep(text, json_text=path.suffix == ".json")
        if line is not None:
            raise SettingsError(
                f"providers file {path}, line {line}: nested too deeply (more than "
                f"{MAX_NESTING} levels)"
            )
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as exc:
        raise SettingsError(
            f"providers file {path} is not valid YAML/JSON: {_one_line(exc)}"
        ) from None
    except RecursionError:  # a last resort: `too_deep` stops these first
        raise SettingsError(f"providers file {path}: nested too deeply") from None
    entries = (data or {}).get("providers") if isinstance(data, dict) else None
    if not isinstance(data, dict) or not isinstance(entries, dict):
        raise SettingsError(f"providers file {path}: expected a top-level `providers:` mapping")
    unknown = [k for k in data if k not in FILE_KEYS and not str(k).startswith("x-")]
    if unknown:
        raise SettingsError(
            f"providers file {path}: unknown top-level key {unknown[0]!r} "
            f"(known: {', '.join(FILE_KEYS)})"
        )
    aliases = data.get("aliases")
    if aliases is None:
        aliases = []
    if not isinstance(aliases, list) or (not aliases and "aliases" in data):
        raise SettingsError(f"providers file {path}: `aliases` must be a non-empty list of names")
    default_alias = data.get("default_alias")
    if default_alias is not None and not isinstance(default_alias, str):
        raise SettingsError(f"providers file {path}: `default_alias` must be one of the aliases")
    configs = []
    for name, cfg in entries.items():
        if not isinstance(cfg, dict):
            raise SettingsError(f"providers file {path}: provider {name!r} is not a mapping")
        if "api_key" in cfg:
            raise SettingsError(
                f"providers file {path}: provider {name!r} has an api_key; keys belong in the "
                f"keychain (agentstream credentials set --secret llm.{name}.api_key)"
            )
        try:
            configs.append(ProviderConfig.model_validate({**cfg, "name": str(name)}))
        except ValidationError as exc:
            raise SettingsError(
                f"providers file {path}: provider {name!r}: {_validation_line(exc)}"
            ) from None
    try:
        budgets = llm_budgets.parse(data, {c.name for c in configs} | {LOCAL})
    except llm_budgets.BudgetError as exc:
        raise SettingsError(f"providers file {path}: {exc}") from None
    out = ProvidersFile(configs, list(aliases), default_alias, budgets)
    try:
        catalog(out.providers, out.aliases, out.default_alias)
    except ModelsError as exc:
        raise SettingsError(f"providers file {path}: {exc}") from None
    return out


def load_providers_file(path: Path) -> list[ProviderConfig]:
    return read_providers_file(path).providers


def catalog(
    configs: list[ProviderConfig], aliases: list[str], default_alias: str | None
) -> ModelCatalog:
    """The model catalog of these providers, with `local` (always there) among them."""
    by_name = {c.name: c for c in configs}
    by_name.setdefault(LOCAL, ProviderConfig(name=LOCAL, kind="local"))
    return ModelCatalog.build(
        providers={n: (c.models, c.default_model) for n, c in by_name.items()},
        aliases=aliases,
        default_alias=default_alias,
    )


def _validation_line(exc: ValidationError) -> str:
    err = exc.errors(include_url=False)[0]
    loc = ".".join(str(p) for p in err["loc"])
    msg = str(err["msg"]).removeprefix("Value error, ")
    more = exc.error_count() - 1
    return (f"{loc}: " if loc else "") + msg + (f" (+{more} more)" if more > 0 else "")


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


class LLMRegistry:
    def __init__(
        self,
        *,
        secrets: SecretSource | None = keychain_secret,
        default_timeout_s: float = 60.0,
        transport_factory: Any = None,
    ) -> None:
        self._secrets = secrets
        self._default_timeout_s = default_timeout_s
        self._configs: dict[str, ProviderConfig] = {}
        self._providers: dict[str, LLMProvider] = {}
        self._transport_factory = transport_factory
        self._aliases: list[str] = []
        self._default_alias: str | None = None
        self._catalog: ModelCatalog | None = None
        #: prices and budgets (none unless the providers file declares them)
        self.budgets = BudgetConfig()
        self.register_provider(LOCAL, {"kind": "local", "model": LOCAL_MODEL})

    @classmethod
    def from_settings(cls, settings: Settings, **kw: Any) -> LLMRegistry:
        reg = cls(default_timeout_s=settings.llm_timeout_s, **kw)
        if settings.llm_providers_file is not None:
            file = read_providers_file(settings.llm_providers_file)
            for cfg in file.providers:
                reg.register_provider(cfg.name, cfg)
            reg.set_aliases(file.aliases, file.default_alias)
            reg.budgets = file.budgets
        return reg

    def set_aliases(self, aliases: list[str], default_alias: str | None = None) -> None:
        """Declare the logical models (raises `ModelsError` when they do not fit the
        providers registered so far)."""
        built = catalog(list(self._configs.values()), aliases, default_alias)
        self._aliases, self._default_alias, self._catalog = list(aliases), default_alias, built

    @property
    def catalog(self) -> ModelCatalog:
        """Aliases and per-provider models, for `models.route` (rebuilt after changes)."""
        if self._catalog is None:
            self._catalog = catalog(
                list(self._configs.values()), self._aliases, self._default_alias
            )
        return self._catalog

    def register_provider(
        self, name: str, config: ProviderConfig | Mapping[str, Any] | LLMProvider
    ) -> None:
        """Declare (or replace) a provider; an LLMProvider instance is used as is."""
        old = self._providers.pop(name, None)
        if old is not None:
            log.info("provider %s re-registered", name)
        self._catalog = None
        if isinstance(config, LLMProvider):
            self._providers[name] = config
            self._configs[name] = config.config
            return
        cfg = (
            config
            if isinstance(config, ProviderConfig)
            else ProviderConfig(**{"name": name, **dict(config)})
        )
        if cfg.name != name:
            cfg = cfg.model_copy(update={"name": name})
        self._configs[name] = cfg

    def names(self) -> list[str]:
        return sorted(self._configs)

    def knows(self, name: str) -> bool:
        """Is `name` a provider the operator declared (a request may name any)?"""
        return name in self._configs or name in self._providers

    def config(self, name: str) -> ProviderConfig:
        try:
            return self._configs[name]
        except KeyError:
            raise ProviderRequestError(f"unknown provider {name!r}", provider=name) from None

    def get_provider(self, name: str) -> LLMProvider:
        provider = self._providers.get(name)
        if provider is None:
            provider = self._providers[name] = self._build(self.config(name))
        return provider

    def _build(self, cfg: ProviderConfig) -> LLMProvider:
        if cfg.kind == "local":
            return LocalProvider(cfg)
        transport = self._transport_factory(cfg) if self._transport_factory else None
        cls: type[HTTPProvider] = OpenAICompatibleProvider
        if cfg.kind == "ollama":
            cls = OllamaProvider
        elif cfg.kind == "anthropic":
            cls = AnthropicProvider
        return cls(
            cfg,
            secrets=self._secrets,
            default_timeout_s=self._default_timeout_s,
            transport=transport,
        )

    async def initialize_provider(self, name: str) -> LLMProvider:
        provider = self.get_provider(name)
        await provider.initialize()
        return provider

    async def check_provider_setup(self, name: str) -> bool:
        try:
            provider = self.get_provider(name)
        except ProviderRequestError:
            return False
        return await provider.check_setup()

    async def aclose(self) -> None:
        for provider in self._providers.values():
            await provider.aclose()
