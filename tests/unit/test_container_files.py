"""The worker image and the compose profile ``cluster``, checked without a container engine.

No Docker engine runs on the development machines or CI, so nothing here builds the image
or starts a container. What is checked instead, from the files themselves:

* **Dockerfile** (parsed instruction by instruction, continuations joined): a build stage
  that makes a wheel from exactly what pyproject.toml needs, a runtime stage on the same
  pinned slim base of the project's Python that installs that wheel only (no source
  tree), a fixed non-root uid before the entrypoint, a healthcheck on /health, and an
  environment that is valid settings without the keychain and without a secret. The
  wheel is really built from what the build stage copies (`pip wheel`, a few seconds).
* **.dockerignore**: keeps var/ (broker data, keyrings, the compose secrets), .venv/ and
  .git/ out, and excludes nothing the build stage copies.
* **docker-compose.kafka.yml, profile cluster**: every worker runs the image built from
  the Dockerfile with its healthcheck, reaches the three brokers over SASL_SSL with
  SCRAM-SHA-512 as a user the brokers create, gets every secret as a compose secret (no
  environment value looks like one), and has a stable identity of its own (group instance
  id, advertised URL, chain key); every AGENTSTREAM_* variable is a real setting (a typo
  fails here); the secrets are the files `python -m agentstream.infra.compose init` makes.
* **infra/prometheus/prometheus.cluster.yml**: every worker is a target, and scrapes
  carry the token compose mounts.
* **infra/compose**: `init`/`check` (certificates name the broker hosts, key stores open,
  modes let the containers read), kafka-broker.sh run with stand-ins for the image, and
  the healthcheck module against a local HTTP server.

What only a real engine would show (the image's own start scripts, DNS on the compose
network) is listed in docs/deploy.md.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import re
import shlex
import shutil
import socket
import stat
import subprocess
import sys
import threading
import tomllib
import zipfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives.serialization import pkcs12

from agentstream.infra.compose import healthcheck, material
from agentstream.infra.kafka import launcher
from agentstream.streams.settings import Settings

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
COMPOSE_FILE = REPO / "docker-compose.kafka.yml"
PROMETHEUS_CLUSTER = REPO / "infra" / "prometheus" / "prometheus.cluster.yml"
BROKER_SCRIPT = REPO / "infra" / "compose" / "kafka-broker.sh"
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
PROFILE = "cluster"
SECRETS_MOUNT = "/run/secrets"

#: AGENTSTREAM_* names that are not settings but documented elsewhere: the launcher's
SETTING_NAMES = {Settings.env_name(name) for name in Settings.model_fields}
LAUNCHER_NAMES = {v for k, v in vars(launcher).items() if k.startswith("ENV_")}
#: settings whose value is a secret: never in an image or a compose file
SECRET_SETTINGS = {
    Settings.env_name(name)
    for name, info in Settings.model_fields.items()
    if "SecretStr" in str(info.annotation)
}
#: names that look secret but configure where secrets are, not what they are
NOT_SECRET_NAMES = {"AGENTSTREAM_SECRET_SOURCES", "AGENTSTREAM_SECRETS_DIR"}
SECRET_NAME = re.compile(r"PASSW|SECRET|TOKEN|CREDENTIAL|PRIVATE|API_?KEY|JAAS", re.IGNORECASE)


# -- the Dockerfile, parsed -------------------------------------------------------------
@dataclass
class Instruction:
    keyword: str
    args: str
    line: int

    def json_args(self) -> list[str]:
        value = json.loads(self.args)
        assert isinstance(value, list), f"line {self.line}: {self.keyword} not in exec form"
        return [str(v) for v in value]

    def flags(self) -> dict[str, str]:
        """Leading --name=value options (COPY --from, HEALTHCHECK --timeout ...)."""
        out = {}
        for token in shlex.split(self.args):
            if not token.startswith("--"):
                break
            name, _, value = token[2:].partition("=")
            out[name] = value
        return out

    def words(self) -> list[str]:
        """The arguments after the options."""
        tokens = shlex.split(self.args)
        return [t for t in tokens if not t.startswith("--")]


@dataclass
class Stage:
    base: str
    name: str
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]

    def env(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for ins in self.all("ENV"):
            for pair in shlex.split(ins.args):
                key, sep, value = pair.partition("=")
                assert sep, f"line {ins.line}: ENV {pair!r}: use the KEY=value form"
                out[key] = value
        return out


def _logical_lines(text: str) -> Iterator[tuple[int, str]]:
    """Instructions with their continuations joined, as the builder reads them: comment
    lines vanish even inside a continuation, and a trailing backslash continues."""
    buffer: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), 1):
        stripped = raw.strip()
        if stripped.startswith("#") or (not stripped and not buffer):
            continue
        if not buffer:
            start = number
        if stripped.endswith("\\"):
            buffer.append(stripped[:-1].strip())
            continue
        buffer.append(stripped)
        yield start, " ".join(part for part in buffer if part)
        buffer = []
    assert not buffer, "the Dockerfile ends inside a continuation"


def parse_dockerfile(text: str) -> tuple[dict[str, str], list[Stage]]:
    """(global ARG defaults, stages) with ${ARG} resolved in FROM."""
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for line, logical in _logical_lines(text):
        keyword, _, args = logical.partition(" ")
        keyword = keyword.upper()
        assert "<<" not in args, f"line {line}: heredocs are not parsed by this test"
        if keyword == "FROM":
            words = args.split()
            base = re.sub(r"\$\{(\w+)\}", lambda m: global_args[m.group(1)], words[0])
            assert len(words) == 3 and words[1].upper() == "AS", f"line {line}: name the stage"
            stages.append(Stage(base=base, name=words[2]))
        elif not stages:
            assert keyword == "ARG", f"line {line}: only ARG may come before FROM"
            name, _, default = args.partition("=")
            global_args[name.strip()] = default.strip()
        else:
            stages[-1].instructions.append(Instruction(keyword, args.strip(), line))
    return global_args, stages


def dockerfile() -> tuple[dict[str, str], list[Stage]]:
    return parse_dockerfile(DOCKERFILE.read_text(encoding="utf-8"))


def build_and_runtime() -> tuple[Stage, Stage]:
    _, stages = dockerfile()
    assert len(stages) >= 2, "a build stage and a runtime stage"
    runtime = stages[-1]
    builders = [s for s in stages[:-1] if any("wheel" in r.args for r in s.all("RUN"))]
    assert len(builders) == 1, "exactly one stage builds the wheels"
    return builders[0], runtime


def project_packages() -> set[str]:
    patterns = PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]
    return {p.rstrip("*").rstrip(".") for p in patterns}


def package_folders() -> set[str]:
    """The folders the wheel is built from: the packages, and the repository folders
    their symlinked subpackages point at (agentstream/streams -> ../streams ...)."""
    folders = set(project_packages())
    for package in project_packages():
        for entry in (REPO / package).iterdir():
            if entry.is_symlink():
                folders.add(entry.resolve().relative_to(REPO).as_posix())
    return folders


def runtime_env() -> dict[str, str]:
    return build_and_runtime()[1].env()


# -- the compose file, parsed -----------------------------------------------------------
def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE_FILE.read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    return data


def profile_services() -> dict[str, dict[str, Any]]:
    return {
        name: svc
        for name, svc in compose()["services"].items()
        if PROFILE in (svc.get("profiles") or [])
    }


def workers() -> dict[str, dict[str, Any]]:
    return {n: s for n, s in profile_services().items() if n.startswith("worker-")}


def brokers() -> dict[str, dict[str, Any]]:
    return {n: s for n, s in profile_services().items() if n.startswith("cluster-kafka-")}


def interpolate(value: str) -> str:
    """Compose's interpolation with an empty shell environment: defaults apply."""

    def one(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name, op, default = match.group(1), match.group(2) or "", match.group(3) or ""
        assert "?" not in op, f"${{{name}{op}}} would stop `docker compose` for everyone"
        return default

    return re.sub(r"\$\$|\$\{(\w+)(:?[-?])?([^}]*)\}", one, value)


def secret_targets(service: dict[str, Any]) -> dict[str, str]:
    """target file name -> compose secret, for one service (long syntax only)."""
    out = {}
    for entry in service.get("secrets") or []:
        assert isinstance(entry, dict), "secrets in the long syntax: source and target"
        out[entry["target"]] = entry["source"]
    return out


def environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    assert isinstance(env, dict), "environment as a mapping"
    return {k: interpolate(str(v)) for k, v in env.items()}


def worker_settings(name: str) -> Settings:
    """What a worker container runs with: the image's ENV, then the service's."""
    env = {**runtime_env(), **environment(workers()[name])}
    return Settings.from_env(env)


def properties(service: dict[str, Any]) -> dict[str, str]:
    """Broker properties from KAFKA_* variables, by the apache/kafka image's rule."""
    out = {}
    for key, value in environment(service).items():
        if not key.startswith("KAFKA_") or key in ("KAFKA_HEAP_OPTS", "KAFKA_OPTS"):
            continue
        body = key.removeprefix("KAFKA_").lower().replace("_", ".")
        out[body.replace("...", "-").replace("..", "_")] = value
    return out


def listeners(value: str) -> dict[str, tuple[str, int]]:
    return {
        name: (host, int(port))
        for name, host, port in re.findall(r"([A-Z_]+)://([^:,]*):(\d+)", value)
    }


def looks_secret(value: str) -> bool:
    """A value that is itself a credential: a JAAS login, a bearer header, or a long
    random-looking token (base64 / hex)."""
    if re.search(r"password\s*=|bearer\s", value, re.IGNORECASE):
        return True
    if re.fullmatch(r"[0-9a-f]{32,}", value):
        return True
    return bool(
        re.fullmatch(r"[A-Za-z0-9+/=_~-]{24,}", value)
        and re.search(r"\d", value)
        and re.search(r"[A-Z]", value)
        and re.search(r"[a-z]", value)
    )


def secret_problems(name: str, value: str, mounted: set[str]) -> list[str]:
    """Why an environment variable `name=value` carries a secret, if it does."""
    problems = []
    if name in SECRET_SETTINGS:
        problems.append(f"{name} is a secret setting")
    if name.startswith("AGENTSTREAM_SECRET_") and name not in NOT_SECRET_NAMES:
        problems.append(f"{name} is the `env` secret source: use a compose secret")
    # with a secret-like name, only a reference to a mounted file is fine
    # (GF_..._PASSWORD__FILE, the Kafka image's ..._CREDENTIALS file names)
    if (
        SECRET_NAME.search(name)
        and name not in NOT_SECRET_NAMES
        and value
        and value.removeprefix(SECRETS_MOUNT + "/") not in mounted
    ):
        problems.append(f"{name}={value!r} is not a mounted secret file")
    if looks_secret(value):
        problems.append(f"{name} has a value that looks like a secret")
    return problems


# == Dockerfile ==========================================================================
def test_parser_joins_continuations_and_drops_comments() -> None:
    _, stages = parse_dockerfile(
        "ARG BASE=python:3.11.9-slim\n"
        "FROM ${BASE} AS one\n"
        "RUN a \\\n"
        "# a comment inside the continuation\n"
        "    && b\n"
        'HEALTHCHECK --timeout=3s CMD ["x"]\n'
    )
    (stage,) = stages
    assert stage.base == "python:3.11.9-slim"
    assert (stage.instructions[0].keyword, stage.instructions[0].args) == ("RUN", "a && b")
    assert stage.instructions[1].flags() == {"timeout": "3s"}
    with pytest.raises(AssertionError):
        parse_dockerfile("FROM x AS a\nRUN a \\\n")


def test_both_stages_use_one_pinned_slim_base_of_the_project_python() -> None:
    _, stages = dockerfile()
    bases = {s.base for s in stages}
    assert len(bases) == 1, f"one base for every stage (wheels must fit): {bases}"
    (base,) = bases
    match = re.fullmatch(r"python:(\d+)\.(\d+)\.(\d+)-slim(-[a-z]+)?", base)
    assert match, f"{base}: python:<major.minor.patch>-slim[-<debian>], pinned by tag"
    project = PYPROJECT["tool"]["mypy"]["python_version"]
    assert f"{match[1]}.{match[2]}" == project
    assert PYPROJECT["project"]["requires-python"] == f">={project}"


def test_build_stage_copies_exactly_what_the_wheel_is_made_of() -> None:
    build, _ = build_and_runtime()
    copied: set[str] = set()
    for ins in build.all("COPY"):
        assert "from" not in ins.flags()
        *sources, _dest = ins.words()
        copied |= {s.rstrip("/") for s in sources}
    assert "." not in copied, "COPY . copies var/, .venv/ ... into the build"
    expected = {
        "pyproject.toml",
        PYPROJECT["project"]["readme"],
        *PYPROJECT["project"].get("license-files", []),
        "constraints.txt",  # the image gets the tested versions, as `make install` does
        *package_folders(),
    }
    assert copied == expected
    assert not build.all("ADD")
    assert any(re.search(r"pip wheel|-m build --wheel", r.args) for r in build.all("RUN"))
    wheel = next(r for r in build.all("RUN") if "pip wheel" in r.args)
    assert re.search(r"(-c|--constraint)\s+constraints\.txt", wheel.args), wheel.args


def test_runtime_stage_installs_the_wheel_only() -> None:
    build, runtime = build_and_runtime()
    assert not runtime.all("ADD")
    for ins in runtime.all("COPY"):
        assert ins.flags().get("from") == build.name, f"line {ins.line}: source in runtime"
    installs = [r for r in runtime.all("RUN") if "pip install" in r.args]
    assert len(installs) == 1
    (install,) = installs
    assert "--no-index" in install.args and "--find-links" in install.args
    assert re.search(rf"from={build.name}\b", install.args), "wheels bind-mounted from build"
    assert install.args.split()[-1] == PYPROJECT["project"]["name"]
    assert not re.search(r"pip install[^&]*(\s\.(\s|$)|-e\s)", install.args)


def test_runtime_runs_as_a_fixed_non_root_user_before_the_entrypoint() -> None:
    _, runtime = build_and_runtime()
    users = runtime.all("USER")
    assert users, "the runtime stage sets USER"
    last = users[-1]
    uid, _, gid = last.args.partition(":")
    assert uid.isdigit() and int(uid) != 0, f"USER {last.args}: a fixed numeric uid, not root"
    assert not gid or (gid.isdigit() and int(gid) != 0)
    (entrypoint,) = runtime.all("ENTRYPOINT")
    assert last.line < entrypoint.line
    created = " ".join(r.args for r in runtime.all("RUN"))
    assert f"--uid {uid}" in created, "the image creates that user"
    data_dir = runtime_env()["AGENTSTREAM_DATA_DIR"]
    assert re.search(rf"install -d -o {uid} -g {gid or uid} -m 07[0-5]0 {data_dir}", created)


def test_entrypoint_is_the_cli_and_the_default_command_a_worker() -> None:
    _, runtime = build_and_runtime()
    (entrypoint,) = runtime.all("ENTRYPOINT")
    (cmd,) = runtime.all("CMD")
    assert entrypoint.json_args() == list(PYPROJECT["project"]["scripts"])
    assert cmd.json_args() == ["worker"]


def test_healthcheck_probes_health_on_the_exposed_web_port() -> None:
    _, runtime = build_and_runtime()
    (check,) = runtime.all("HEALTHCHECK")
    flags = check.flags()
    assert {"interval", "timeout", "start-period", "retries"} <= set(flags)
    docker_timeout = float(flags["timeout"].removesuffix("s"))
    assert docker_timeout > healthcheck.TIMEOUT_S, "the probe gives up before Docker does"
    command = check.args[check.args.index("CMD") + 3 :].strip()
    assert json.loads(command) == ["python", "-m", healthcheck.__name__]
    assert healthcheck.__name__.split(".")[0] in project_packages(), "the probe is in the wheel"
    port = Settings.model_fields["web_port"].default
    assert [e.args for e in runtime.all("EXPOSE")] == [str(port)]
    assert port == healthcheck.DEFAULT_PORT
    assert healthcheck.health_url(runtime_env()) == f"http://127.0.0.1:{port}/health"


def test_image_environment_is_valid_settings_without_the_keychain() -> None:
    env = runtime_env()
    names = {k for k in env if k.startswith("AGENTSTREAM_")}
    assert names <= SETTING_NAMES, f"not settings: {sorted(names - SETTING_NAMES)}"
    settings = Settings.from_env(env)
    assert str(settings.data_dir) == "/var/lib/agentstream"
    assert settings.web_host == "0.0.0.0"
    assert settings.secret_source_list == ["env", "dir"], "no keychain in a container"
    assert str(settings.secrets_dir) == SECRETS_MOUNT


def test_no_secret_in_image_env_or_args() -> None:
    global_args, stages = dockerfile()
    values = dict(global_args)
    for stage in stages:
        values |= stage.env()
        for ins in stage.all("ARG"):
            name, _, default = ins.args.partition("=")
            values[name.strip()] = default.strip()
    for name, value in values.items():
        assert not secret_problems(name, value, mounted=set()), name


def test_dockerignore_keeps_state_out_and_the_build_in() -> None:
    patterns = [
        line.strip().rstrip("/")
        for line in DOCKERIGNORE.read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert not [p for p in patterns if p.startswith("!")], "no re-includes to reason about"
    for must in ("var", ".venv", ".git", "**/__pycache__"):
        assert must in patterns, must

    def ignored(path: str) -> bool:
        parts = path.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        return any(
            fnmatch(prefix, p) or (p.startswith("**/") and fnmatch(parts[-1], p[3:]))
            for p in patterns
            for prefix in prefixes
        )

    assert ignored("var/compose/secrets/kafka.sasl_password")
    assert ignored("streams/__pycache__")
    build, _ = build_and_runtime()
    for ins in build.all("COPY"):
        for source in ins.words()[:-1]:
            source = source.rstrip("/")
            assert not ignored(source), f"{source} is copied but .dockerignore excludes it"
            for file in (REPO / source).rglob("*.py") if (REPO / source).is_dir() else []:
                rel = file.relative_to(REPO).as_posix()
                assert not ignored(rel), f"{rel} is excluded from the build"


def test_wheel_builds_from_what_the_build_stage_copies(tmp_path: Path) -> None:
    # The build stage's context, and nothing else: a file the wheel needs but the
    # Dockerfile does not copy fails here, as it would in `docker build`.
    build, _ = build_and_runtime()
    src = tmp_path / "src"
    src.mkdir()
    for ins in build.all("COPY"):
        for source in ins.words()[:-1]:
            path = REPO / source.rstrip("/")
            if path.is_dir():  # symlinks kept, as COPY keeps them
                shutil.copytree(
                    path,
                    src / path.name,
                    symlinks=True,
                    ignore=shutil.ignore_patterns("__pycache__"),
                )
            else:
                shutil.copy2(path, src / path.name)
    out = tmp_path / "wheels"
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--wheel-dir", str(out), str(src)],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    (wheel,) = out.glob("agentstream-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert tops - {n for n in tops if n.endswith(".dist-info")} == {"agentstream"}
    assert "agentstream/infra/compose/healthcheck.py" in names
    assert "agentstream/streams/__main__.py" in names
    # what the installed code reads besides Python (`agentstream kafka start`, monitoring)
    assert {
        "agentstream/py.typed",
        "agentstream/infra/kafka/pom.xml",
        "agentstream/infra/kafka/log4j.properties",
        "agentstream/infra/kafka/log4j2.properties",
        "agentstream/infra/prometheus/prometheus.yml",
        "agentstream/infra/grafana/dashboards/agentstream.json",
    } <= set(names)
    (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "agentstream = agentstream.streams.__main__:main" in text


# == compose: profile "cluster" ==========================================================
def test_profile_has_three_brokers_three_workers_and_monitoring() -> None:
    assert tuple(sorted(brokers())) == material.BROKERS
    assert tuple(sorted(workers())) == material.WORKERS
    rest = set(profile_services()) - set(brokers()) - set(workers())
    assert rest == {"cluster-prometheus", "cluster-grafana"}
    for name, service in profile_services().items():
        assert service["profiles"] == [PROFILE], name
        assert list(service["networks"]) == ["cluster"], f"{name}: on the cluster network only"
        for port in service.get("ports", []):
            assert port.startswith("127.0.0.1:"), f"{name}: {port} only on the loopback"
    assert "cluster" in compose()["networks"]


def test_every_worker_runs_the_image_built_from_the_dockerfile_with_its_healthcheck() -> None:
    images = set()
    for name, service in workers().items():
        build = service["build"]
        assert build["context"] == "." and (REPO / build["dockerfile"]) == DOCKERFILE, name
        images.add(service["image"])
        # the image's HEALTHCHECK applies unless the service replaces or disables it
        assert "healthcheck" not in service, f"{name}: keep the image's healthcheck"
        assert "entrypoint" not in service and "command" not in service, name
        assert "user" not in service, f"{name}: the image's non-root user"
        assert service["init"] is True and service["cap_drop"] == ["ALL"], name
        assert service["restart"] == "unless-stopped", name
        for broker in brokers():
            assert service["depends_on"][broker] == {"condition": "service_healthy"}, name
    assert len(images) == 1


def test_workers_reach_the_three_brokers_over_sasl_ssl_as_a_scram_user() -> None:
    internal = {
        f"{host}:{port}"
        for service in brokers().values()
        for name, (host, port) in listeners(properties(service)["advertised.listeners"]).items()
        if name == properties(service)["inter.broker.listener.name"]
    }
    assert len(internal) == 3
    for name, service in workers().items():
        settings = worker_settings(name)
        assert settings.kafka_security_protocol == "SASL_SSL", name
        assert set((settings.kafka_bootstrap or "").split(",")) == internal, name
        for broker in brokers().values():
            enabled = properties(broker)["sasl.enabled.mechanisms"].split(",")
            assert settings.kafka_sasl_mechanism in enabled, name
        assert settings.kafka_sasl_username in material.SCRAM_USERS
        for broker in brokers().values():
            assert settings.kafka_sasl_username in environment(broker)["SCRAM_USERS"].split()
        assert settings.kafka_ssl_check_hostname is True
        ca_target = {v: k for k, v in secret_targets(service).items()}["kafka_ca"]
        assert str(settings.kafka_ssl_cafile) == f"{SECRETS_MOUNT}/{ca_target}"
        assert settings.topic_replication == len(brokers()) == material.TOPIC_REPLICATION
        assert settings.topic_partitions == material.TOPIC_PARTITIONS
        assert settings.secret_source_list == ["env", "dir"]


def test_each_worker_has_a_stable_identity_of_its_own() -> None:
    seen: dict[str, set[str]] = {}
    port = Settings.model_fields["web_port"].default
    for name, service in workers().items():
        settings = worker_settings(name)
        assert service["hostname"] == name
        assert settings.group_instance_id == name, "static membership, stable per service"
        assert settings.web_advertised_url == f"http://{name}:{port}"
        assert settings.worker_id == name
        (published,) = service["ports"]
        assert published.endswith(f":{port}")
        data_dir = runtime_env()["AGENTSTREAM_DATA_DIR"]
        assert service["volumes"] == [f"{name}-data:{data_dir}"]
        for what, value in (
            ("group instance id", settings.group_instance_id),
            ("advertised url", settings.web_advertised_url),
            ("chain key", settings.chain_key_id),
            ("host port", published),
        ):
            assert value not in seen.setdefault(what, set()), f"{name}: {what} {value} reused"
            seen[what].add(str(value))


def test_worker_secrets_are_compose_secrets_named_as_their_entries() -> None:
    for name, service in workers().items():
        settings = worker_settings(name)
        targets = secret_targets(service)
        expected = {
            "kafka-ca.pem": "kafka_ca",
            "kafka.sasl_password": f"kafka_{settings.kafka_sasl_username}_password",
            f"chain_key.{settings.chain_key_id}": f"chain_key_{name.replace('-', '_')}",
            "web.tokens": "web_tokens",
            "web.cluster_token": "web_cluster_token",
        }
        assert targets == expected, name


def test_no_service_of_the_profile_has_a_secret_in_its_environment() -> None:
    for name, service in profile_services().items():
        mounted = set(secret_targets(service))
        for key, value in environment(service).items():
            assert not secret_problems(key, value, mounted), (name, key)


def test_secret_check_catches_what_it_should() -> None:
    mounted = {"kafka-keystore-password", "grafana-admin-password"}
    bad = {
        "AGENTSTREAM_SECRET_KAFKA_SASL_PASSWORD": "x",
        "AGENTSTREAM_KEYRING_PASSWORD": "hunter2",
        "GF_SECURITY_ADMIN_PASSWORD": "admin",
        "KAFKA_LISTENER_NAME_INTERNAL_SCRAM___SHA___512_SASL_JAAS_CONFIG": 'x password="y";',
        "SOME_VALUE": "3f2a9c" * 8,
        "OTHER": "ast_Zq8Xn2Lk0Vb7Rt5Yu3Ws1Pd9Fg6Hj4",
    }
    for key, value in bad.items():
        assert secret_problems(key, value, mounted), key
    good = {
        "GF_SECURITY_ADMIN_PASSWORD__FILE": "/run/secrets/grafana-admin-password",
        "KAFKA_SSL_KEY_CREDENTIALS": "kafka-keystore-password",
        "AGENTSTREAM_SECRET_SOURCES": "env,dir",
        "CLUSTER_ID": "xDE2Ay0VTn6KVd2BMDt9XQ",
        "KAFKA_OPTS": "-Dorg.apache.kafka.sasl.oauthbearer.allowed.urls=",
    }
    for key, value in good.items():
        assert not secret_problems(key, value, mounted), key


def _strings(value: Any) -> Iterator[str]:
    """Every key and value of a parsed YAML document (comments are not in it)."""
    if isinstance(value, dict):
        for key, item in value.items():
            yield str(key)
            yield from _strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)
    elif value is not None:
        yield str(value)


def test_every_agentstream_variable_is_a_setting_or_a_launcher_variable() -> None:
    variable = re.compile(r"\bAGENTSTREAM_[A-Z0-9_]+")
    used = {m for text in _strings(compose()) for m in variable.findall(text)}
    _, stages = dockerfile()
    for stage in stages:
        for ins in stage.instructions:
            used |= set(variable.findall(ins.args))
    assert "AGENTSTREAM_SECURITY_ADMIN_KEYS" in used, "interpolations are scanned too"
    unknown = used - SETTING_NAMES - LAUNCHER_NAMES
    assert not unknown, f"not a setting (typo?): {sorted(unknown)}"
    for service in compose()["services"].values():
        names = {k for k in environment(service) if k.startswith("AGENTSTREAM_")}
        assert names <= SETTING_NAMES


def test_compose_secrets_are_the_files_init_makes_and_all_are_used() -> None:
    declared = compose()["secrets"]
    expected = {
        name: {"file": f"./{material.DEFAULT_DIR.as_posix()}/{material.SECRETS}/{file}"}
        for name, file in material.COMPOSE_SECRETS.items()
    }
    assert declared == expected
    used = {s for svc in compose()["services"].values() for s in secret_targets(svc).values()}
    assert used == set(declared)


def test_brokers_mount_what_kafka_broker_sh_and_the_image_read() -> None:
    for index, (name, service) in enumerate(sorted(brokers().items()), 1):
        env = environment(service)
        targets = secret_targets(service)
        assert targets[env["KAFKA_SSL_KEYSTORE_FILENAME"]] == f"kafka_keystore_{index}", name
        # set here: the image sets it only for listeners named like TLS protocols
        keystore = f"{SECRETS_MOUNT}/{env['KAFKA_SSL_KEYSTORE_FILENAME']}"
        assert env["KAFKA_SSL_KEYSTORE_LOCATION"] == keystore
        assert "SSL://" not in env["KAFKA_ADVERTISED_LISTENERS"]
        assert targets[env["KAFKA_SSL_KEYSTORE_CREDENTIALS"]] == "kafka_keystore_password"
        assert targets[env["KAFKA_SSL_KEY_CREDENTIALS"]] == "kafka_keystore_password"
        assert env["KAFKA_SSL_TRUSTSTORE_LOCATION"] == f"{SECRETS_MOUNT}/kafka-ca.pem"
        assert targets["kafka-ca.pem"] == "kafka_ca"
        assert env["SCRAM_USERS"].split() == list(material.SCRAM_USERS)
        for user in material.SCRAM_USERS:
            assert targets[f"kafka-{user}-password"] == f"kafka_{user}_password", name
        script = "./infra/compose/kafka-broker.sh"
        (mount,) = [v for v in service["volumes"] if v.startswith(script + ":")]
        assert mount.endswith(":ro")
        assert service["command"] == ["bash", mount.split(":")[1]]
        test = " ".join(service["healthcheck"]["test"])
        assert "--command-config /opt/kafka/config/healthcheck.properties" in test
        assert "KAFKA_ADVERTISED_LISTENERS" in env and service["hostname"] == name


def test_prometheus_scrapes_every_worker_with_the_mounted_token() -> None:
    prom = profile_services()["cluster-prometheus"]
    config_mount = "./infra/prometheus/prometheus.cluster.yml:/etc/prometheus/prometheus.yml:ro"
    assert config_mount in prom["volumes"]
    config = yaml.safe_load(PROMETHEUS_CLUSTER.read_text(encoding="utf-8"))
    (job,) = config["scrape_configs"]
    assert job["metrics_path"] == "/metrics"
    assert job.get("scheme", "http") == "http"
    token_target = {v: k for k, v in secret_targets(prom).items()}["prometheus_token"]
    assert job["authorization"] == {
        "type": "Bearer",
        "credentials_file": f"{SECRETS_MOUNT}/{token_target}",
    }
    targets = {t for static in job["static_configs"] for t in static["targets"]}
    advertised = {
        (worker_settings(name).web_advertised_url or "").removeprefix("http://")
        for name in workers()
    }
    assert targets == advertised
    assert Settings.from_env(runtime_env()).web_auth == "token", "hence the token"


def test_grafana_of_the_profile_reaches_its_prometheus_and_keeps_its_password_in_a_file() -> None:
    grafana = profile_services()["cluster-grafana"]
    prom = profile_services()["cluster-prometheus"]
    datasource = yaml.safe_load(
        (REPO / "infra/grafana/provisioning/datasources/prometheus.yml").read_text()
    )["datasources"][0]
    host = re.match(r"http://([^:/]+)", datasource["url"])
    assert host and host[1] in prom["networks"]["cluster"]["aliases"]
    env = environment(grafana)
    assert env["GF_SECURITY_ADMIN_PASSWORD__FILE"] == f"{SECRETS_MOUNT}/grafana-admin-password"
    assert env["GF_AUTH_ANONYMOUS_ENABLED"] == "false"
    mounts = {v.split(":")[0] for v in grafana["volumes"]}
    assert {"./infra/grafana/provisioning", "./infra/grafana/dashboards"} <= mounts


# == infra/compose: init, check ==========================================================
def _with_web_tokens(root: Path) -> str:
    """What `agentstream web token create` leaves: the index (mode 0600) and the token."""
    token = "ast_" + "Zq8Xn2Lk0Vb7Rt5Yu3Ws1Pd9Fg6Hj4Aa1Bb2Cc3D"
    index = {
        "format": "agentstream-web-tokens",
        "version": 1,
        "tokens": [
            {
                "id": "3f9c1a2b",
                "name": "prometheus",
                "scope": "read",
                "created": "2026-01-02T03:04:05Z",
                "sha256": hashlib.sha256(token.encode()).hexdigest(),
            }
        ],
    }
    secrets_dir = root / material.SECRETS
    (secrets_dir / material.WEB_TOKENS_FILE).write_text(json.dumps(index))
    os.chmod(secrets_dir / material.WEB_TOKENS_FILE, 0o600)
    (secrets_dir / material.PROMETHEUS_TOKEN_FILE).write_text(token + "\n")
    return token


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """var/compose as `init` and `agentstream web token create` leave it (read only)."""
    root = tmp_path_factory.mktemp("compose")
    material.init(root)
    _with_web_tokens(root)
    return root


def test_init_makes_every_file_but_the_web_tokens_and_check_says_so(tmp_path: Path) -> None:
    made = material.init(tmp_path)
    secrets_dir = tmp_path / material.SECRETS
    present = {p.name for p in secrets_dir.iterdir()}
    assert present == set(material.COMPOSE_SECRETS.values()) - set(material.MADE_BY_OPERATOR)
    assert (tmp_path / material.CA_KEY_FILE).stat().st_mode & 0o777 == 0o600
    assert material.CA_KEY_FILE in made
    report = material.check(tmp_path)
    assert len(report.problems) == 2
    assert all("web token create" in p for p in report.problems)


def test_check_passes_and_makes_the_files_readable_to_the_containers(tmp_path: Path) -> None:
    material.init(tmp_path)
    _with_web_tokens(tmp_path)
    report = material.check(tmp_path)
    assert report.problems == []
    assert report.fixed == [f"{tmp_path / material.SECRETS / material.WEB_TOKENS_FILE}: 0644"]
    for file in material.COMPOSE_SECRETS.values():
        assert stat.S_IMODE((tmp_path / material.SECRETS / file).stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / material.SECRETS).stat().st_mode) == 0o700
    assert material.check(tmp_path).fixed == []


def test_init_never_replaces_a_file(made: Path) -> None:
    before = {p.name: p.read_bytes() for p in (made / material.SECRETS).iterdir()}
    assert material.init(made) == []
    after = {p.name: p.read_bytes() for p in (made / material.SECRETS).iterdir()}
    assert after == before


def test_init_refuses_half_a_ca_and_orphaned_key_stores(tmp_path: Path) -> None:
    material.init(tmp_path)
    (tmp_path / material.CA_KEY_FILE).unlink()
    with pytest.raises(material.MaterialError, match="go together"):
        material.init(tmp_path)
    (tmp_path / material.SECRETS / material.CA_FILE).unlink()
    with pytest.raises(material.MaterialError, match=r"kafka-keystore-1\.p12"):
        material.init(tmp_path)


def test_broker_certificates_name_the_compose_hosts_and_chain_to_the_ca(made: Path) -> None:
    secrets_dir = made / material.SECRETS
    ca = x509.load_pem_x509_certificate((secrets_dir / material.CA_FILE).read_bytes())
    password = material.read_secret(secrets_dir / material.KEYSTORE_PASSWORD_FILE).encode()
    for index, host in enumerate(sorted(brokers()), 1):
        key, cert, chain = pkcs12.load_key_and_certificates(
            (secrets_dir / material.keystore_file(index)).read_bytes(), password
        )
        assert key is not None and cert is not None
        cert.verify_directly_issued_by(ca)
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert host in san.get_values_for_type(x509.DNSName)
        assert "localhost" in san.get_values_for_type(x509.DNSName)
        assert [c.subject for c in chain] == [ca.subject]
        # the host names the brokers advertise are the ones certified
        listener_hosts = {
            h for h, _ in listeners(properties(brokers()[host])["advertised.listeners"]).values()
        }
        assert listener_hosts <= set(material.broker_names(host))


def test_check_finds_a_broken_key_store_password_and_a_bad_scram_password(
    tmp_path: Path,
) -> None:
    material.init(tmp_path)
    _with_web_tokens(tmp_path)
    secrets_dir = tmp_path / material.SECRETS
    (secrets_dir / material.KEYSTORE_PASSWORD_FILE).write_text("not-the-password")
    (secrets_dir / "kafka-worker-password").write_text("has,comma=and]bracket")
    problems = "\n".join(material.check(tmp_path).problems)
    assert "kafka-keystore-1.p12: cannot be opened" in problems
    assert "kafka-worker-password: a SCRAM password" in problems


def test_operator_env_points_the_host_cli_at_the_profile(made: Path) -> None:
    env: dict[str, str] = {}
    for line in (made / material.OPERATOR_ENV_FILE).read_text().splitlines():
        if line.startswith("export "):
            key, _, value = line.removeprefix("export ").partition("=")
            env[key] = shlex.split(value)[0]
    assert set(env) <= SETTING_NAMES
    settings = Settings.from_env(env)
    published = {
        f"127.0.0.1:{port.split(':')[1]}" for b in brokers().values() for port in b["ports"]
    }
    assert set((settings.kafka_bootstrap or "").split(",")) == published
    assert settings.kafka_sasl_username == material.OPERATOR
    assert settings.secret_source_list[0] == "dir", "web token create writes to the dir"
    assert Path(settings.secrets_dir) == (made / material.SECRETS).resolve()
    assert (Path(settings.secrets_dir) / "kafka.sasl_password").is_file()
    worker_1 = worker_settings("worker-1")
    assert (settings.topic_partitions, settings.topic_replication) == (
        worker_1.topic_partitions,
        worker_1.topic_replication,
    )
    assert workers()["worker-1"]["ports"] == [f"127.0.0.1:{settings.web_port}:6066"]


# == infra/compose/kafka-broker.sh, with stand-ins for the image =========================
def _broker_run(tmp_path: Path, made: Path, **overrides: str) -> subprocess.CompletedProcess[str]:
    """Run the script as cluster-kafka-1 would, with the image's paths replaced: the
    storage tool and the image's start record what they were given."""
    secrets_dir = tmp_path / "run-secrets"
    secrets_dir.mkdir()
    service = brokers()["cluster-kafka-1"]
    for target, source in secret_targets(service).items():
        file = material.COMPOSE_SECRETS[source]
        shutil.copy(made / material.SECRETS / file, secrets_dir / target)
    (tmp_path / "etc-secrets").mkdir()
    kafka = tmp_path / "kafka"
    (kafka / "bin").mkdir(parents=True)
    (kafka / "config").mkdir()
    storage = kafka / "bin" / "kafka-storage.sh"
    storage.write_text(
        "#!/bin/bash\n"
        f"printf '%s\\n' \"$@\" > {tmp_path}/format-args\n"
        "prev=\n"
        'for a in "$@"; do\n'
        f'  if [[ $prev == --config ]]; then cp "$a" {tmp_path}/format-props; fi\n'
        "  prev=$a\n"
        "done\n"
    )
    run = tmp_path / "run"
    run.write_text(f"#!/bin/bash\nenv > {tmp_path}/run-env\n")
    for script in (storage, run):
        script.chmod(0o755)
    env = {
        "PATH": os.environ["PATH"],
        **environment(service),
        "KAFKA_SSL_TRUSTSTORE_LOCATION": str(secrets_dir / "kafka-ca.pem"),
        "KAFKA_SSL_KEYSTORE_LOCATION": str(secrets_dir / "kafka-keystore.p12"),
        "BROKER_SECRETS": str(secrets_dir),
        "BROKER_IMAGE_SECRETS": str(tmp_path / "etc-secrets"),
        "BROKER_KAFKA_DIR": str(kafka),
        "BROKER_RUN": str(run),
        **overrides,
    }
    return subprocess.run(
        ["bash", str(BROKER_SCRIPT)], env=env, capture_output=True, text=True, timeout=30
    )


def test_broker_script_is_valid_bash() -> None:
    done = subprocess.run(["bash", "-n", str(BROKER_SCRIPT)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_broker_script_formats_with_every_scram_user_then_starts_the_image(
    tmp_path: Path, made: Path
) -> None:
    done = _broker_run(tmp_path, made)
    assert done.returncode == 0, done.stderr
    secrets_dir = made / material.SECRETS
    args = (tmp_path / "format-args").read_text().splitlines()
    assert args[:4] == ["format", "--ignore-formatted", "--cluster-id", "xDE2Ay0VTn6KVd2BMDt9XQ"]
    scram = [args[i + 1] for i, a in enumerate(args) if a == "--add-scram"]
    assert scram == [
        f"SCRAM-SHA-512=[name={user},password="
        f"{material.read_secret(secrets_dir / material.scram_password_file(user))}]"
        for user in material.SCRAM_USERS
    ]
    # the storage is formatted from the very properties the image renders
    props = dict(
        line.split("=", 1) for line in (tmp_path / "format-props").read_text().splitlines()
    )
    expected = properties(brokers()["cluster-kafka-1"])
    moved = ("ssl.truststore.location", "ssl.keystore.location")  # stand-in paths
    assert {k: props[k] for k in expected if k not in moved} == {
        k: v for k, v in expected.items() if k not in moved
    }
    # the key store's password comes from its secret file, whatever the image does
    keystore_password = material.read_secret(secrets_dir / material.KEYSTORE_PASSWORD_FILE)
    assert props["ssl.keystore.password"] == props["ssl.key.password"] == keystore_password
    broker_password = material.read_secret(secrets_dir / "kafka-broker-password")
    jaas = props["listener.name.internal.scram-sha-512.sasl.jaas.config"]
    assert f'username="broker" password="{broker_password}"' in jaas
    assert "listener.name.external.scram-sha-512.sasl.jaas.config" in props
    assert "listener.name.controller.scram-sha-512.sasl.jaas.config" not in props
    # handed over to the image's start with the logins set and the key store linked
    run_env = (tmp_path / "run-env").read_text()
    assert "KAFKA_LISTENER_NAME_INTERNAL_SCRAM___SHA___512_SASL_JAAS_CONFIG=" in run_env
    assert f"KAFKA_SSL_KEYSTORE_PASSWORD={keystore_password}" in run_env.splitlines()
    link = tmp_path / "etc-secrets" / "kafka-keystore.p12"
    assert link.is_symlink() and link.resolve() == (tmp_path / "run-secrets/kafka-keystore.p12")
    client = tmp_path / "kafka" / "config" / "healthcheck.properties"
    assert stat.S_IMODE(client.stat().st_mode) == 0o600
    assert "security.protocol=SASL_SSL" in client.read_text()
    rendered = Path(args[args.index("--config") + 1])
    assert not rendered.exists(), "the rendered properties (with the JAAS login) are removed"


def test_broker_script_stops_on_a_password_it_cannot_pass_on(tmp_path: Path, made: Path) -> None:
    done = _broker_run(tmp_path, made, SCRAM_USERS="broker worker nobody")
    assert done.returncode != 0
    assert "kafka-nobody-password is missing" in done.stderr
    assert not (tmp_path / "run-env").exists(), "the broker must not start"


# == infra/compose/healthcheck.py ========================================================
class _Health(http.server.BaseHTTPRequestHandler):
    answer: tuple[int, bytes] = (200, b'{"status": "alive"}')

    def do_GET(self) -> None:
        code, body = self.answer
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def health_server() -> Iterator[http.server.HTTPServer]:
    server = http.server.HTTPServer(("127.0.0.1", 0), _Health)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def test_healthcheck_says_alive_even_behind_a_proxy(
    health_server: http.server.HTTPServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a proxy nobody listens on: the probe of 127.0.0.1 must not go there
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")
    monkeypatch.setenv("http_proxy", "http://127.0.0.1:9")
    url = healthcheck.health_url({"AGENTSTREAM_WEB_PORT": str(health_server.server_port)})
    assert healthcheck.probe(url) is None


def test_healthcheck_reports_an_error_status_and_a_closed_port(
    health_server: http.server.HTTPServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    port = health_server.server_port
    monkeypatch.setattr(_Health, "answer", (503, b"{}"))
    assert "HTTP 503" in (healthcheck.probe(f"http://127.0.0.1:{port}/health") or "")
    monkeypatch.setattr(_Health, "answer", (200, b'{"status": "starting"}'))
    assert "unexpected" in (healthcheck.probe(f"http://127.0.0.1:{port}/health") or "")
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        nobody = free.getsockname()[1]  # bound, never listening: refused
        closed = healthcheck.probe(f"http://127.0.0.1:{nobody}/health", timeout_s=1)
    assert closed and "refused" in closed


def test_healthcheck_speaks_https_when_the_views_do() -> None:
    env: Mapping[str, str] = {"AGENTSTREAM_WEB_TLS_CERTFILE": "/c.pem", "AGENTSTREAM_WEB_PORT": "7"}
    assert healthcheck.health_url(env) == "https://127.0.0.1:7/health"
