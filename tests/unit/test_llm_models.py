"""Logical models: which model each provider of a request's chain is sent
(`agents/llm/models.py`), the providers file's aliases, and the schema versions that
carry them."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest
from pydantic import ValidationError

from agentstream.agents.llm.models import Hop, ModelCatalog, ModelsError, route
from agentstream.agents.llm.providers.base import ProviderConfig
from agentstream.agents.llm.registry import LLMRegistry, read_providers_file
from agentstream.schemas import Event, encode, registry
from agentstream.schemas.llm import (
    AttemptRecord,
    ChatMessage,
    LLMConfig,
    LLMContext,
    LLMRequest,
    LLMResponse,
)
from agentstream.streams.settings import Settings, SettingsError

#: the documented shape: OpenAI maps both aliases, Ollama serves the default with its own
#: default model, local is always there
PROVIDERS = {
    "openai": ({"fast": "gpt-4o-mini", "smart": "gpt-4o"}, ""),
    "ollama": ({}, "llama3.2"),
    "vllm": ({"smart": "meta-llama/Llama-3.1-70B-Instruct"}, ""),
    "local": ({}, "local-echo"),
}


def catalog(**kw: object) -> ModelCatalog:
    args: dict[str, object] = {
        "providers": PROVIDERS,
        "aliases": ["fast", "smart"],
        "default_alias": "fast",
        **kw,
    }
    return ModelCatalog.build(**args)  # type: ignore[arg-type]


LEGACY = ModelCatalog.build(providers={"openai": ({}, ""), "ollama": ({}, "llama3.2")})


def hops(
    cat: ModelCatalog,
    model: str | None,
    provider: str | None = "openai",
    fallback: tuple[str, ...] = ("ollama",),
) -> list[tuple[str, str, str]]:
    """(provider, model, skip reason) of each hop."""
    r = route(cat, model=model, provider=provider, fallback=fallback, default_provider="local")
    return [(h.provider, h.model, h.skip) for h in r.hops]


# -- aliases ------------------------------------------------------------------------------
def test_an_alias_sends_each_provider_its_own_model() -> None:
    r = route(
        catalog(),
        model="fast",
        provider="openai",
        fallback=["ollama"],
        default_provider="local",
    )
    assert r.hops == (Hop("openai", "gpt-4o-mini"), Hop("ollama", "llama3.2"))
    assert r.alias == "fast" and r.head == "openai" and r.model_of("ollama") == "llama3.2"


def test_no_model_is_the_default_alias() -> None:
    assert hops(catalog(), None) == hops(catalog(), "fast")
    assert route(
        catalog(), model=None, provider=None, fallback=[], default_provider="local"
    ).hops == (Hop("local", "local-echo"),)


def test_a_provider_that_maps_no_model_for_the_alias_is_skipped() -> None:
    assert hops(catalog(), "smart", fallback=("ollama", "vllm")) == [
        ("openai", "gpt-4o", ""),
        ("ollama", "", "'ollama' serves no model for 'smart'"),
        ("vllm", "meta-llama/Llama-3.1-70B-Instruct", ""),
    ]


def test_an_alias_mapped_by_no_provider_of_the_chain_skips_them_all() -> None:
    assert hops(catalog(), "smart", provider="ollama", fallback=("local",)) == [
        ("ollama", "", "'ollama' serves no model for 'smart'"),
        ("local", "", "'local' serves no model for 'smart'"),
    ]


def test_without_a_default_alias_each_provider_uses_its_default_model() -> None:
    cat = catalog(default_alias=None)
    assert hops(cat, None) == [
        ("openai", "", "the request names no model and 'openai' has no default model"),
        ("ollama", "llama3.2", ""),
    ]
    # and a provider's default does not stand in for an alias that is not the default
    assert hops(cat, "fast")[1] == ("ollama", "", "'ollama' serves no model for 'fast'")


# -- provider/model -------------------------------------------------------------------------
def test_provider_slash_model_goes_to_that_provider_only() -> None:
    assert hops(catalog(), "ollama/qwen2.5:7b", provider="openai") == [
        ("openai", "", "the request names 'ollama''s model"),
        ("ollama", "qwen2.5:7b", ""),
    ]
    # with no provider on the request, the named one heads the chain
    r = route(
        catalog(),
        model="vllm/meta-llama/Llama-3.1-8B-Instruct",
        provider=None,
        fallback=[],
        default_provider="local",
    )
    assert r.hops == (Hop("vllm", "meta-llama/Llama-3.1-8B-Instruct"),) and r.alias == ""


def test_provider_model_of_a_provider_not_in_the_chain_skips_the_chain() -> None:
    assert hops(catalog(), "vllm/x", provider="openai", fallback=()) == [
        ("openai", "", "the request names 'vllm''s model"),
    ]


def test_a_provider_with_no_model_after_the_slash() -> None:
    reason = "model 'openai/' names provider 'openai' but no model of it"
    assert hops(catalog(), "openai/", fallback=()) == [("openai", "", reason)]
    assert hops(catalog(), "openai/   ", fallback=())[0][2].startswith("model 'openai/")


# -- odd and hostile names -------------------------------------------------------------------
def test_unknown_model_skips_every_provider_and_says_what_was_meant() -> None:
    out = hops(catalog(), "fsat")
    assert [h[1] for h in out] == ["", ""]
    assert out[0][2] == (
        "unknown model 'fsat': not an alias nor provider/model (did you mean 'fast'?)"
    )
    assert "did you mean 'smart'" in hops(catalog(), "Smart")[0][2]  # aliases keep their case
    assert "did you mean provider 'openai'" in hops(catalog(), "OpenAI/gpt-4o")[0][2]
    assert hops(catalog(), "gpt-4o-mini")[0][2].startswith("unknown model 'gpt-4o-mini'")
    assert hops(catalog(), "zzz/x")[0][2] == (
        "unknown model 'zzz/x': not an alias nor provider/model"
    )


def test_blank_model_names_are_refused_and_spaces_around_a_name_ignored() -> None:
    with pytest.raises(ValidationError):
        LLMConfig(model="")  # the schema refuses the empty name outright
    assert hops(catalog(), "   ", fallback=())[0] == (
        "openai",
        "",
        "the request's model name is blank",
    )
    assert hops(LEGACY, "\t\n", fallback=())[0][2] == "the request's model name is blank"
    assert hops(catalog(), "  smart ", fallback=()) == [("openai", "gpt-4o", "")]
    assert hops(catalog(), " openai/gpt-4.1 ", fallback=()) == [("openai", "gpt-4.1", "")]


def test_unknown_providers_are_marked_not_looked_up() -> None:
    r = route(
        catalog(), model="fast", provider="nope", fallback=["openai", "nope"], default_provider="x"
    )
    assert r.hops == (
        Hop("nope", skip="unknown provider 'nope'", known=False),  # once: the chain is deduped
        Hop("openai", "gpt-4o-mini"),
    )


def test_without_aliases_names_pass_through_unchanged() -> None:
    """A providers file from before aliases: every provider gets the request's model
    as is — including `a/b` names, which are real model ids there."""
    assert hops(LEGACY, "gpt-4o-mini") == [
        ("openai", "gpt-4o-mini", ""),
        ("ollama", "gpt-4o-mini", ""),
    ]
    assert hops(LEGACY, "openai/gpt-4o") == [
        ("openai", "openai/gpt-4o", ""),
        ("ollama", "openai/gpt-4o", ""),
    ]
    assert hops(LEGACY, None)[1] == ("ollama", "llama3.2", "")
    assert (
        route(LEGACY, model="m", provider=None, fallback=[], default_provider="ollama").alias == ""
    )


# -- the catalogue's own checks ------------------------------------------------------------
@pytest.mark.parametrize(
    ("kw", "message"),
    [
        (
            {"default_alias": "fats"},
            "default_alias: 'fats' is not one of the aliases (did you mean 'fast'?)",
        ),
        ({"aliases": ["fast", "smart", "fast"]}, "aliases: 'fast' is declared twice"),
        ({"aliases": ["fast", " smart"]}, "aliases: ' smart' has spaces around it"),
        ({"aliases": ["fast", ""]}, "aliases: '' is not a name"),
        ({"aliases": ["fast", 7]}, "aliases: 7 is not a name"),
        ({"aliases": ["fast", ["x"]]}, "aliases: ['x'] is not a name"),
        ({"aliases": ["fast", "x" * 300]}, "is longer than 256"),
        ({"aliases": ["fast", "smart", "openai/gpt-4o"]}, "reads as provider 'openai'"),
        ({"aliases": ["fast", "smart", "cheap"]}, "alias 'cheap' is served by no provider"),
        (
            {"providers": {**PROVIDERS, "ollama": ({"fsat": "llama3.2"}, "")}},
            "provider 'ollama' maps 'fsat', which is not one of the aliases (did you mean 'fast'?)",
        ),
        (
            {"providers": {**PROVIDERS, "a/b": ({}, "m")}},
            "provider 'a/b': with aliases, a provider's name has no '/'",
        ),
        ({"aliases": [], "default_alias": None}, "provider 'openai' maps models, but no aliases"),
    ],
)
def test_catalogue_mistakes_are_named(kw: dict[str, object], message: str) -> None:
    with pytest.raises(ModelsError) as info:
        catalog(**kw)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_the_default_alias_is_served_by_provider_defaults() -> None:
    # nobody maps `fast`, but every provider's default model serves the default alias
    cat = ModelCatalog.build(
        providers={"ollama": ({}, "llama3.2")}, aliases=["fast"], default_alias="fast"
    )
    assert cat.serves("ollama", "fast") == "llama3.2"
    with pytest.raises(ModelsError, match="'fast' is served by no provider"):
        ModelCatalog.build(providers={"ollama": ({}, "llama3.2")}, aliases=["fast"])


def test_azure_takes_a_deployment_or_a_map_not_both() -> None:
    with pytest.raises(ValidationError, match="not both"):
        ProviderConfig(name="az", kind="azure", deployment="d", models={"fast": "d2"})
    assert ProviderConfig(name="az", kind="azure", deployment="d").default_model == "d"
    assert ProviderConfig(name="l", kind="local").default_model == "local-echo"
    with pytest.raises(ValidationError, match="not a model name"):
        ProviderConfig(name="o", models={"fast": "  "})


# -- the providers file --------------------------------------------------------------------
def write(tmp_path: Path, text: str, name: str = "p.yaml") -> Path:
    f = tmp_path / name
    f.write_text(text)
    return f


DOC_EXAMPLE = """\
aliases: [fast, smart]
default_alias: fast
x-local: &ollama-base {kind: ollama, base_url: "http://127.0.0.1:11434"}
providers:
  openai:
    kind: openai
    base_url: https://api.openai.com/v1
    models: {fast: gpt-4o-mini, smart: gpt-4o}
  ollama:
    <<: *ollama-base
    model: llama3.2
"""


def test_a_file_with_aliases(tmp_path: Path) -> None:
    reg = LLMRegistry.from_settings(Settings(llm_providers_file=write(tmp_path, DOC_EXAMPLE)))
    cat = reg.catalog
    assert cat.aliases == {"fast", "smart"} and cat.default_alias == "fast"
    r = route(cat, model=None, provider="openai", fallback=["ollama"], default_provider="local")
    assert [(h.provider, h.model) for h in r.hops] == [
        ("openai", "gpt-4o-mini"),
        ("ollama", "llama3.2"),  # not gpt-4o-mini
    ]
    assert reg.config("ollama").base_url == "http://127.0.0.1:11434"


def test_an_old_file_still_loads_and_passes_names_through(tmp_path: Path) -> None:
    old = "providers:\n  vllm: {kind: vllm, base_url: 'http://h:8000/v1', model: qwen}\n"
    reg = LLMRegistry.from_settings(Settings(llm_providers_file=write(tmp_path, old)))
    assert not reg.catalog.aliases
    r = route(
        reg.catalog,
        model="gpt-4o-mini",
        provider="vllm",
        fallback=["local"],
        default_provider="local",
    )
    assert [h.model for h in r.hops] == ["gpt-4o-mini", "gpt-4o-mini"]
    # a provider's default model is now used: for requests that name none
    r = route(
        reg.catalog, model=None, provider="vllm", fallback=["local"], default_provider="local"
    )
    assert [h.model for h in r.hops] == ["qwen", "local-echo"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "alias: [fast]\nproviders: {}\n",
            "unknown top-level key 'alias' "
            "(known: providers, aliases, default_alias, prices, budgets)",
        ),
        ("aliases: fast\nproviders: {}\n", "`aliases` must be a non-empty list of names"),
        ("aliases:\nproviders: {}\n", "`aliases` must be a non-empty list of names"),
        (
            "aliases: [fast]\ndefault_alias: [fast]\nproviders: {}\n",
            "`default_alias` must be one of",
        ),
        (
            "aliases: [fast]\nproviders:\n  o: {kind: ollama, models: {fast: 3}}\n",
            "provider 'o': models.fast: Input should be a valid string",
        ),
        (
            "aliases: [fast]\nproviders:\n  o: {kind: ollama, models: {fats: m}}\n",
            "provider 'o' maps 'fats', which is not one of the aliases (did you mean 'fast'?)",
        ),
        (
            "providers:\n  o: {kind: ollama, modles: {fast: m}}\n",
            "provider 'o': modles: Extra inputs",
        ),
        ("providers:\n  o: {1: x}\n", "provider 'o': 1: Keys should be strings"),
        ("providers:\n  o: {kind: ollama, name: other}\n", None),  # the key names it
        ("[1, 2]\n", "expected a top-level `providers:` mapping"),
        ("providers: [1]\n", "expected a top-level `providers:` mapping"),
        ("providers: {o: {kind: [\n", "is not valid YAML/JSON"),
    ],
)
def test_providers_file_mistakes_are_one_line(
    tmp_path: Path, text: str, message: str | None
) -> None:
    f = write(tmp_path, text)
    if message is None:
        assert read_providers_file(f).providers[0].name == "o"
        return
    with pytest.raises(SettingsError) as info:
        read_providers_file(f)
    text_of = str(info.value)
    assert message in text_of and text_of.startswith(f"providers file {f}") and "\n" not in text_of


# -- the schema versions ---------------------------------------------------------------------
CONTEXT = {"messages": [{"role": "user", "content": "hi"}]}


def test_a_request_may_leave_out_its_model_and_its_config() -> None:
    r = LLMRequest(
        request_id="r",
        agent_id="a",
        context=LLMContext(messages=[ChatMessage(role="user", content="hi")]),
    )
    assert r.config.model is None
    back = registry.decode(encode(Event.of(r, source="t")))
    assert back.schema_version == LLMRequest.VERSION and back.payload == r


def test_version_1_requests_and_responses_still_decode() -> None:
    req_v1 = {
        "type": "llm.request",
        "schema_version": 1,
        "source": "s",
        "payload": {
            "request_id": "r",
            "agent_id": "a",
            "context": CONTEXT,
            "config": {"model": "gpt-4o-mini"},
        },
    }
    ev = registry.from_dict(req_v1)
    assert ev.schema_version == 3 and ev.payload.config.model == "gpt-4o-mini"
    resp_v1 = {
        "type": "llm.response",
        "schema_version": 1,
        "source": "s",
        "payload": {
            "request_id": "r",
            "status": "completed",
            "provider": "openai",
            "model": "gpt-4o-mini",
            "attempts": [{"provider": "openai", "attempt": 1, "outcome": "ok"}],
            "hash": "h",
        },
    }
    resp = registry.from_dict(resp_v1).payload
    assert isinstance(resp, LLMResponse)
    assert resp.alias == "" and resp.attempts == [
        AttemptRecord(provider="openai", attempt=1, outcome="ok")
    ]
    # what a v1 reader would have refused stays refused
    bad = orjson.loads(orjson.dumps(resp_v1))
    bad["payload"]["attempts"][0]["outcome"] = "maybe"
    with pytest.raises(Exception, match="outcome"):
        registry.from_dict(bad)


def test_the_documented_example_sends_each_provider_its_own_model(tmp_path: Path) -> None:
    """docs/llm.md's providers file and example request, as a user would copy them."""
    import json
    import re

    doc = (Path(__file__).resolve().parents[2] / "docs" / "llm.md").read_text()
    section = doc[doc.index("### Providers file") :]
    yaml_text = re.search(r"```yaml\n(.*?)```", section, re.S)
    assert yaml_text is not None
    reg = LLMRegistry.from_settings(
        Settings(llm_providers_file=write(tmp_path, yaml_text.group(1)))
    )
    json_text = re.search(r"Example request.*?```json\n(.*?)```", doc, re.S)
    assert json_text is not None
    request = LLMRequest.model_validate(json.loads(json_text.group(1)))
    r = route(
        reg.catalog,
        model=request.config.model,
        provider=request.provider,
        fallback=request.fallback,
        default_provider="local",
    )
    assert [(h.provider, h.model) for h in r.hops] == [
        ("openai", "gpt-4o-mini"),
        ("ollama", "llama3.2"),
    ]
    smart = route(
        reg.catalog,
        model="smart",
        provider="openai",
        fallback=["ollama", "vllm"],
        default_provider="local",
    )
    assert [(h.provider, h.model, bool(h.skip)) for h in smart.hops] == [
        ("openai", "gpt-4o", False),
        ("ollama", "", True),
        ("vllm", "meta-llama/Llama-3.1-70B-Instruct", False),
    ]
    assert reg.catalog.serves("azure", "fast") == "mini-prod"


def test_usage_counts_every_model_the_registry_declares_under_its_name(tmp_path: Path) -> None:
    """The usage table reads the providers file without the agents (`rebuild` too): it
    must declare every provider and model name the registry does (the metrics' labels),
    so a declared model never lands in `other`."""
    from agentstream.agents.llm.providers.base import LOCAL_MODEL, model_label
    from agentstream.streams import llm_budgets
    from agentstream.streams.tables import llm as tables

    azure = (
        "  az: {kind: azure, base_url: 'https://r.openai.azure.com', deployment: dep,\n"
        "       api_version: '2024-06-01'}\n"
        "prices:\n  az: {gpt-4o-2024-08-06: {input: 1, output: 1}}\n"
    )
    path = write(tmp_path, DOC_EXAMPLE + azure)
    reg = LLMRegistry.from_settings(Settings(llm_providers_file=path))
    names = tables.usage_names(llm_budgets.read_file(path))
    assert tables.LOCAL_MODEL == LOCAL_MODEL
    assert set(names.models) == set(reg.names())
    for name in reg.names():
        cfg = reg.config(name)
        declared = {cfg.default_model, *cfg.models.values()} - {""}
        assert declared <= names.models[name], name
        for m in declared:
            assert model_label(cfg, m) in (m, "other")
            assert names.model(name, [m]) == m
    assert names.model("az", ["gpt-4o-2024-08-06"]) == "gpt-4o-2024-08-06"  # priced
    assert names.model("ollama", ["llama-made-up"]) == "other"


def test_the_declared_head_is_never_a_made_up_name() -> None:
    cat = ModelCatalog.build(providers={"local": ({}, "local-echo")})
    r = route(cat, model=None, provider="zz", fallback=["local"], default_provider="local")
    assert r.head == "zz" and r.declared_head == "local"
    r = route(cat, model=None, provider="zz", fallback=[], default_provider="local")
    assert r.declared_head == ""
