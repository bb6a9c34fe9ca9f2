"""LLMRegistry: provider name → configured, lazily initialised provider.

Providers are declared in a YAML or JSON file (`AGENTSTREAM_LLM_PROVIDERS_FILE`)::

    providers:
      openai:   {kind: openai, base_url: "https://api.openai.com/v1", requires_key: true}
      azure:    {kind: azure, base_url: "https://res.openai.azure.com",
                 deployment: gpt4o, api_version: "2024-06-01", requires_key: true}
      vllm:     {kind: vllm, base_url: "http://127.0.0.1:8000/v1"}
      ollama:   {kind: ollama, base_url: "http://127.0.0.1:11434"}

`local` (the deterministic offline provider) is always registered. Keys are never in
the file: a provider with `requires_key: true` reads `llm.<name>.api_key` from the OS
keychain through `streams.credentials.KeychainCredentialsProvider`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from agentstream.agents.llm.providers._http import HTTPProvider
from agentstream.agents.llm.providers.base import LLMProvider, ProviderConfig, SecretSource
from agentstream.agents.llm.providers.local import LocalProvider
from agentstream.agents.llm.providers.ollama import OllamaProvider
from agentstream.agents.llm.providers.openai import OpenAICompatibleProvider
from agentstream.streams.errors import ProviderRequestError
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


def load_providers_file(path: Path) -> list[ProviderConfig]:
    try:
        text = path.read_text()
    except OSError as exc:
        raise SettingsError(f"cannot read providers file {path}: {exc}") from None
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as exc:
        raise SettingsError(f"providers file {path} is not valid YAML/JSON: {exc}") from None
    entries = (data or {}).get("providers") if isinstance(data, dict) else None
    if not isinstance(entries, dict):
        raise SettingsError(f"providers file {path}: expected a top-level `providers:` mapping")
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
            configs.append(ProviderConfig(name=str(name), **cfg))
        except ValidationError as exc:
            raise SettingsError(f"providers file {path}: provider {name!r}: {exc}") from None
    return configs


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
        self.register_provider(LOCAL, {"kind": "local", "model": "local-echo"})

    @classmethod
    def from_settings(cls, settings: Settings, **kw: Any) -> LLMRegistry:
        reg = cls(default_timeout_s=settings.llm_timeout_s, **kw)
        if settings.llm_providers_file is not None:
            for cfg in load_providers_file(settings.llm_providers_file):
                reg.register_provider(cfg.name, cfg)
        return reg

    def register_provider(
        self, name: str, config: ProviderConfig | Mapping[str, Any] | LLMProvider
    ) -> None:
        """Declare (or replace) a provider; an LLMProvider instance is used as is."""
        old = self._providers.pop(name, None)
        if old is not None:
            log.info("provider %s re-registered", name)
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
        cls: type[HTTPProvider] = (
            OllamaProvider if cfg.kind == "ollama" else OpenAICompatibleProvider
        )
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
