"""The policy file carries the whole security config: every field of `SecurityConfig`
that docs/security.md lists can be published with `agentstream policy apply`, merged
over the config in force, and nothing else is accepted at the top level."""

from __future__ import annotations

import pytest

from agentstream.agents.security.cli import (
    CONFIG_FIELDS,
    PolicyFileError,
    _config_update,
    parse_policy_file,
)
from agentstream.schemas.security import SecurityConfig

FULL = """
enabled: true
default_action: allow
levels: [public, internal, secret]
anonymous_levels: [public]
replay_window_s: 60
rejected_redaction: hash
trust_claimed_roles: false
policies:
  - policy_id: p1
    level: "*"
"""


def test_every_documented_config_field_can_be_given() -> None:
    items, config = parse_policy_file(FULL, "full.yaml")
    assert [i["policy_id"] for i in items] == ["p1"]
    assert config == {
        "enabled": True,
        "default_action": "allow",
        "levels": ["public", "internal", "secret"],
        "anonymous_levels": ["public"],
        "replay_window_s": 60,
        "rejected_redaction": "hash",
        "trust_claimed_roles": False,
    }
    published = SecurityConfig.model_validate(_config_update({}, config))
    assert published.replay_window_s == 60.0
    assert published.anonymous_levels == ["public"]
    assert published.rejected_redaction == "hash"


def test_the_config_fields_are_the_models_less_what_the_cli_sets_itself() -> None:
    signed_or_keyed = {"config_id", "version", "signed_by", "signature", "policies"}
    assert set(CONFIG_FIELDS) == set(SecurityConfig.model_fields) - signed_or_keyed


def test_a_partial_config_keeps_the_rest_of_the_one_in_force() -> None:
    in_force = {
        "__config__": {
            "config_id": "__config__",
            "version": 4,
            "enabled": True,
            "default_action": "deny",
            "replay_window_s": 30.0,
            "rejected_redaction": "hash",
            "signed_by": "admin",
            "signature": "x",
        }
    }
    _, config = parse_policy_file("anonymous_levels: [public]\npolicies: []\n")
    assert config is not None
    merged = SecurityConfig.model_validate(_config_update(in_force, config))
    assert merged.version == 5
    assert merged.replay_window_s == 30.0  # kept
    assert merged.rejected_redaction == "hash"  # kept
    assert merged.anonymous_levels == ["public"]  # changed


@pytest.mark.parametrize("key", ["config_id", "version", "signature", "signed_by", "levles"])
def test_other_top_level_keys_are_refused(key: str) -> None:
    with pytest.raises(PolicyFileError, match=f"unknown top-level keys: {key}"):
        parse_policy_file(f"{key}: 1\npolicies: []\n", "f.yaml")


def test_a_file_of_policies_only_publishes_no_config() -> None:
    assert parse_policy_file("policies: [{policy_id: p}]\n")[1] is None
