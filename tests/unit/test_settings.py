"""Settings: environment parsing, validation errors, masking, and their documentation
(the table of docs/configuration.md)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from agentstream.streams.settings import Settings, SettingsError

REPO = Path(__file__).resolve().parents[2]
CONFIGURATION = REPO / "docs" / "configuration.md"
TABLE_HEADER = "| Variable | Default | Meaning |"


def documented_table() -> list[str]:
    """The settings table of docs/configuration.md: its header to its last row."""
    lines = CONFIGURATION.read_text().splitlines()
    start = lines.index(TABLE_HEADER)
    end = start
    while end < len(lines) and lines[end].startswith("|"):
        end += 1
    return lines[start:end]


def test_reads_prefixed_environment() -> None:
    s = Settings.from_env(
        {
            "AGENTSTREAM_WEB_PORT": "7001",
            "AGENTSTREAM_TOPIC_PREFIX": "stg.",
            "AGENTSTREAM_SECURITY_ENABLED": "false",
            "UNRELATED": "x",
        }
    )
    assert s.web_port == 7001
    assert s.security_enabled is False
    assert s.topic("agent.messages") == "stg.agent.messages"


def test_bootstrap_defaults_to_local_broker_port() -> None:
    assert Settings.from_env({"AGENTSTREAM_KAFKA_PORT": "12345"}).bootstrap == "127.0.0.1:12345"
    assert Settings.from_env({"AGENTSTREAM_KAFKA_BOOTSTRAP": "k:9"}).bootstrap == "k:9"


def test_invalid_value_names_the_variable() -> None:
    with pytest.raises(SettingsError, match="AGENTSTREAM_TOPIC_PARTITIONS"):
        Settings.from_env({"AGENTSTREAM_TOPIC_PARTITIONS": "0"})
    with pytest.raises(SettingsError, match="AGENTSTREAM_PROCESSING_GUARANTEE"):
        Settings.from_env({"AGENTSTREAM_PROCESSING_GUARANTEE": "maybe_once"})


@pytest.mark.parametrize(
    "variable", ["AGENTSTREAM_MAX_DECOMPRESSED_BATCH_BYTES", "AGENTSTREAM_MAX_COMPRESSION_RATIO"]
)
@pytest.mark.parametrize("value", ["0", "-1", "64MiB", "1.5"])
def test_a_decompression_limit_that_is_not_a_positive_integer_is_one_error(
    variable: str, value: str
) -> None:
    with pytest.raises(SettingsError) as error:
        Settings.from_env({variable: value})
    assert len(error.value.problems) == 1
    assert error.value.problems[0].startswith(f"{variable}='{value}'")


def test_the_decompression_limits_default_to_64_mib_and_100_to_1() -> None:
    assert Settings.from_env({}).max_decompressed_batch_bytes == 64 * 1024 * 1024
    assert Settings.from_env({}).max_compression_ratio == 100
    limit = {"AGENTSTREAM_MAX_DECOMPRESSED_BATCH_BYTES": "8388608"}
    assert Settings.from_env(limit).max_decompressed_batch_bytes == 8 * 1024 * 1024
    ratio = {"AGENTSTREAM_MAX_COMPRESSION_RATIO": "400"}
    assert Settings.from_env(ratio).max_compression_ratio == 400


def test_settings_are_frozen() -> None:
    s = Settings.from_env({})
    with pytest.raises(Exception, match="frozen"):
        s.web_port = 1  # type: ignore[misc]


def test_secrets_are_masked_everywhere() -> None:
    s = Settings.from_env({"AGENTSTREAM_KEYRING_PASSWORD": "hunter2-very-secret"})
    assert "hunter2" not in repr(s)
    assert "hunter2" not in str(s.describe())
    assert s.keyring_password is not None
    assert s.keyring_password.get_secret_value() == "hunter2-very-secret"


def test_every_variable_is_in_the_configuration_table() -> None:
    documented = set(
        re.findall(r"^\| `(AGENTSTREAM_[A-Z0-9_]+)` \|", "\n".join(documented_table()), re.M)
    )
    missing = [
        Settings.env_name(f)
        for f in Settings.model_fields
        if Settings.env_name(f) not in documented
    ]
    assert not missing, f"docs/configuration.md's settings table lacks {missing}"


def test_configuration_table_is_what_config_markdown_prints(tmp_path: Path) -> None:
    """The table is generated, never edited by hand: `agentstream config --markdown`
    prints it, from a clean environment (defaults only)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AGENTSTREAM_")}
    env.update(
        HOME=str(tmp_path), PYTHONPATH=str(REPO), AGENTSTREAM_STATE_DIR=str(tmp_path / "state")
    )
    res = subprocess.run(
        [sys.executable, "-m", "agentstream", "config", "--markdown"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines() == documented_table(), (
        "docs/configuration.md's table differs from `agentstream config --markdown`: "
        "paste the command's output over it"
    )


def test_every_bad_variable_is_reported_at_once() -> None:
    with pytest.raises(SettingsError) as info:
        Settings.from_env({"AGENTSTREAM_TOPIC_PARTITIONS": "zero", "AGENTSTREAM_WEB_PORT": "http"})
    lines = str(info.value).splitlines()
    assert len(lines) == 2, lines
    assert lines[0].startswith("AGENTSTREAM_TOPIC_PARTITIONS='zero': ")
    assert lines[1].startswith("AGENTSTREAM_WEB_PORT='http': ")
    assert info.value.problems == lines
    assert info.value.context["field"] == "topic_partitions"


def test_rules_across_fields_are_reported_with_the_bad_fields() -> None:
    # pydantic checks `_consistent` only once every field is valid: still one run
    # tells the user both the bad value and the missing username
    with pytest.raises(SettingsError) as info:
        Settings.from_env(
            {
                "AGENTSTREAM_KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
                "AGENTSTREAM_KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
                "AGENTSTREAM_TOPIC_PARTITIONS": "0",
                "AGENTSTREAM_SECRET_SOURCES": "vault",
            }
        )
    lines = info.value.problems
    assert [line.split("=")[0].split(" ")[0] for line in lines] == [
        "AGENTSTREAM_TOPIC_PARTITIONS",
        "AGENTSTREAM_KAFKA_SASL_USERNAME",
        "AGENTSTREAM_SECRET_SOURCES",
    ], lines


def test_a_rule_about_a_variable_already_reported_is_not_repeated() -> None:
    with pytest.raises(SettingsError) as info:
        Settings.from_env(
            {
                "AGENTSTREAM_KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
                "AGENTSTREAM_KAFKA_SASL_MECHANISM": "SCRAM",
                "AGENTSTREAM_KAFKA_SASL_USERNAME": "me",
            }
        )
    assert info.value.problems == [
        "AGENTSTREAM_KAFKA_SASL_MECHANISM='SCRAM': Input should be 'PLAIN', "
        "'SCRAM-SHA-256' or 'SCRAM-SHA-512'"
    ]


def test_a_secret_value_is_never_echoed_in_an_error() -> None:
    with pytest.raises(SettingsError) as info:
        Settings.from_env({"AGENTSTREAM_TOPIC_PARTITIONS": "0"}, keyring_password=5)
    assert "AGENTSTREAM_KEYRING_PASSWORD:" in str(info.value)
    assert "5" not in str(info.value).split("AGENTSTREAM_KEYRING_PASSWORD")[1]


@pytest.mark.parametrize(
    "url",
    [
        "http://w1:6066/views",
        "http://w1:6066/#",
        "http://u:p@w1:6066",
        "https://w1:6066",  # https without the web server's certificate
        "w1:6066",
    ],
)
def test_the_advertised_url_is_a_worker_root(url: str) -> None:
    # the other workers call this URL with the cluster token: nothing but a root
    with pytest.raises(SettingsError, match="AGENTSTREAM_WEB_ADVERTISED_URL"):
        Settings.from_env({"AGENTSTREAM_WEB_ADVERTISED_URL": url})
    ok = Settings.from_env({"AGENTSTREAM_WEB_ADVERTISED_URL": "http://w1.internal:6066/"})
    assert ok.web_advertised_url == "http://w1.internal:6066/"


@pytest.mark.parametrize(
    "url", ["http://w1:6066#", "http://w1:6066?", "http://w1:abc", "http://w1:99999"]
)
def test_an_advertised_url_the_other_workers_would_refuse_is_refused_here(url: str) -> None:
    with pytest.raises(SettingsError, match="AGENTSTREAM_WEB_ADVERTISED_URL"):
        Settings.from_env({"AGENTSTREAM_WEB_ADVERTISED_URL": url})


@pytest.mark.parametrize("bootstrap", ["kafka.invalid", "host:abc", "h:0", "h:70000", "::1:9092"])
def test_a_bootstrap_without_a_port_is_one_settings_error(bootstrap: str) -> None:
    """TLS and SASL clients read the port of each bootstrap entry: `kafka.invalid` was a
    raw ValueError from int() deep in a client, with its producer left unclosed."""
    with pytest.raises(SettingsError, match="AGENTSTREAM_KAFKA_BOOTSTRAP"):
        Settings.from_env({"AGENTSTREAM_KAFKA_BOOTSTRAP": bootstrap})


def test_bootstraps_as_clusters_write_them() -> None:
    for ok in ("k:9", "b-1.example:9096, b-2.example:9096", "[::1]:9092"):
        assert Settings.from_env({"AGENTSTREAM_KAFKA_BOOTSTRAP": ok}).kafka_bootstrap == ok


def test_a_dead_letter_cap_that_cannot_fit_names_both_settings() -> None:
    # 900,000 original bytes are 1.2 MB in base64: every such dead letter was over the
    # producer's request limit, refused, and the worker crashed on it after each restart
    for env in (
        {"AGENTSTREAM_DEADLETTER_MAX_ORIGINAL_BYTES": "900000"},
        {
            "AGENTSTREAM_DEADLETTER_MAX_ORIGINAL_BYTES": "100000",
            "AGENTSTREAM_MAX_EVENT_BYTES": "100000",
        },
    ):
        with pytest.raises(SettingsError) as info:
            Settings.from_env(env)
        [line] = info.value.problems
        assert line.startswith("AGENTSTREAM_DEADLETTER_MAX_ORIGINAL_BYTES=")
        assert "AGENTSTREAM_MAX_EVENT_BYTES=" in line and "at most " in line


def test_a_dead_letter_cap_left_unset_follows_the_event_limit() -> None:
    # the default fits the default event limit; a lower event limit alone is no mistake
    # (the dead letters are fitted to it: `streams.processing.fit_dead_letter`)
    assert Settings.from_env({}).deadletter_max_original_bytes == 700_000
    assert Settings.from_env({"AGENTSTREAM_MAX_EVENT_BYTES": "100000"})
    assert Settings.from_env({"AGENTSTREAM_DEADLETTER_MAX_ORIGINAL_BYTES": "700000"})


@pytest.mark.parametrize(
    ("host", "root"),
    [
        ("127.0.0.1", "http://127.0.0.1:6066"),
        ("::1", "http://[::1]:6066"),
        ("fe80::1%eth0", "http://[fe80::1%eth0]:6066"),
        ("0.0.0.0", "http://127.0.0.1:6066"),  # a wildcard bind is asked on loopback
    ],
)
def test_an_ipv6_web_host_is_bracketed_in_urls(
    host: str, root: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # `http://::1:6066` is no URL: Faust's canonical URL and the CLI's web root were built
    # so, and every command ended in "port can't be converted to integer"
    from yarl import URL

    from agentstream.streams.app import advertised_url
    from agentstream.streams.cli import web_root
    from agentstream.streams.settings import get_settings, worker_root

    monkeypatch.setenv("AGENTSTREAM_WEB_HOST", host)
    get_settings.cache_clear()
    try:
        assert web_root() == root
        settings = get_settings()
    finally:
        get_settings.cache_clear()
    advertised = advertised_url(settings)
    if ":" in host:  # Faust's own default would be unbracketed
        assert advertised == root
    if advertised is not None:
        assert URL(advertised).port == 6066
        assert worker_root(advertised, scheme="http") == advertised  # what peers accept


def test_what_stops_a_path_from_being_a_directory(tmp_path: Path) -> None:
    from agentstream.streams.settings import not_a_directory

    afile = tmp_path / "afile"
    afile.write_text("x")
    assert not_a_directory(tmp_path) is None
    assert not_a_directory(tmp_path / "not" / "yet") is None  # can be made
    assert not_a_directory(afile) == afile
    assert not_a_directory(afile / "below" / "it") == afile


def test_directories_that_are_files_name_their_variable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """They said "[Errno 20] Not a directory: '<state>/worker'" (or "secret source dir
    failed: NotADirectoryError") naming no variable."""
    afile = tmp_path / "afile"
    afile.write_text("x")
    monkeypatch.setenv("AGENTSTREAM_STATE_DIR", str(afile))
    with pytest.raises(SettingsError) as info:
        Settings.from_env(
            {"AGENTSTREAM_SECRET_SOURCES": "env,dir", "AGENTSTREAM_SECRETS_DIR": str(afile / "s")}
        )
    # the default data dir below the state dir is not named twice
    assert info.value.problems == [
        f"AGENTSTREAM_STATE_DIR={str(afile)!r}: not a directory",
        f"AGENTSTREAM_SECRETS_DIR={str(afile / 's')!r}: {afile} is not a directory",
    ]
    monkeypatch.delenv("AGENTSTREAM_STATE_DIR")
    # the secrets dir is no concern of a chain without the `dir` source
    Settings.from_env({"AGENTSTREAM_SECRETS_DIR": str(afile)})
    with pytest.raises(SettingsError, match=r"AGENTSTREAM_DATA_DIR=.*: not a directory"):
        Settings.from_env({"AGENTSTREAM_DATA_DIR": str(afile)})


def test_an_agent_expiry_near_the_timeout_is_refused() -> None:
    # an entry gone before its "down" was decided would never be published down
    with pytest.raises(SettingsError) as info:
        Settings.from_env({"AGENTSTREAM_HEARTBEAT_EXPIRE_S": "100"})
    assert info.value.problems == [
        "AGENTSTREAM_HEARTBEAT_EXPIRE_S=100: at least 10 times "
        "AGENTSTREAM_HEARTBEAT_TIMEOUT_S plus AGENTSTREAM_HEARTBEAT_INTERVAL_S (200)"
    ]
    ok = Settings.from_env(
        {
            "AGENTSTREAM_HEARTBEAT_EXPIRE_S": "35",
            "AGENTSTREAM_HEARTBEAT_TIMEOUT_S": "3",
            "AGENTSTREAM_HEARTBEAT_INTERVAL_S": "0.5",
        }
    )
    assert ok.heartbeat_expire_s == 35
