"""Shared fixtures. Integration tests run against a real Apache Kafka broker started by the
project's launcher (or the cluster in AGENTSTREAM_KAFKA_BOOTSTRAP); if it cannot start,
they fail — they never skip.

Under pytest-xdist (`-n N`, docs/development.md) every worker is a pytest session of its
own, yet all of them share one broker of each kind (`kafka_bootstrap`, `secured_kafka`):
the first worker to need one starts it (the launcher's start is idempotent and holds a
file lock, so a second worker waits for it and then reuses it), no worker stops it, and
the controller process, which outlives the workers, stops at the end of the run the
brokers that were not running when the run began (`pytest_sessionstart` /
`pytest_unconfigure` below). Without xdist (`-n 0`) the session fixtures stop them, as
they always did."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from agentstream.infra.kafka.launcher import BrokerConfig

REPO = Path(__file__).resolve().parent.parent
TEST_KAFKA_PORT = int(os.environ.get("AGENTSTREAM_TEST_KAFKA_PORT", "19192"))


#: the repository folders under their own names: importable here (the root is on sys.path)
#: but never ours to import — `agentstream.<name>` is; a test that imported one would run
#: a second copy of our modules (and, for `agents`, shadow the OpenAI Agents SDK)
BARE_NAMES = ("agents", "streams", "schemas", "infra")


@pytest.fixture(autouse=True, scope="session")
def _only_agentstream_imports() -> Iterator[None]:
    yield
    import sys

    bare = [n for n in BARE_NAMES if n in sys.modules]
    assert not bare, f"imported outside `agentstream`: {bare}"


@pytest.fixture(autouse=True)
def _restore_environ() -> Iterator[None]:
    """Some tests point this process at their namespace through AGENTSTREAM_* variables;
    never let that leak into the next test (e.g. a leaked AGENTSTREAM_KAFKA_BOOTSTRAP
    makes the launcher report an external cluster)."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


def _test_broker_config() -> BrokerConfig:
    """The launcher's config of the plain test broker (AGENTSTREAM_TEST_KAFKA_PORT)."""
    from agentstream.infra.kafka import launcher

    return launcher.BrokerConfig.from_env(
        {
            "AGENTSTREAM_KAFKA_PORT": str(TEST_KAFKA_PORT),
            "AGENTSTREAM_KAFKA_CONTROLLER_PORT": str(TEST_KAFKA_PORT + 1),
            "AGENTSTREAM_KAFKA_DATA_DIR": str(REPO / "var" / "test-kafka" / "data"),
            "AGENTSTREAM_KAFKA_LOG_FILE": str(REPO / "var" / "test-kafka" / "broker.log"),
            **{k: v for k, v in os.environ.items() if k == "AGENTSTREAM_KAFKA_VERSION"},
        }
    )


def _keep_brokers() -> bool:
    return os.environ.get("AGENTSTREAM_TEST_KEEP_BROKER") == "1"


def _xdist_worker(config: pytest.Config) -> bool:
    """This session is one of pytest-xdist's workers (the controller stops the brokers)."""
    return hasattr(config, "workerinput")


def _xdist_controller(config: pytest.Config) -> bool:
    """This process hands tests to pytest-xdist workers and runs none itself."""
    return config.pluginmanager.has_plugin("dsession")


#: The pytest-xdist groups (docs/development.md, "Running tests in parallel"). The tests of
#: one group run on one worker, one after another; everything else is spread freely.
XDIST_GROUPS = {
    "own-kafka": "starts a Kafka broker, cluster or Toxiproxy of its own: their ports come "
    "from free_port_block, free when asked but not reserved, and they are heavy",
    "fault-injection": "kills or rebalances workers on the shared broker and bounds how "
    "long they take to resume: not two of them at once on a 2-core machine",
    "acls": "test_acls.py's module fixture (a deployment with ACLs, ~30 s): set up once",
    "cli-mistakes": "test_cli_mistakes.py's module fixture (46 CLI start-ups): run once",
    "repo-var": "writes below the repository's var/, or checks that `--help` does not",
}

# `--dist loadgroup` as pytest-xdist 3.8 implements it appends "@group" to a grouped test's
# node id on the worker, and its scheduler reads the group back from the id. Since pytest 9.2
# node ids are no longer a plain attribute and the suffix is silently lost
# (pytest-dev/pytest-xdist#1386): every test would be scheduled on its own. So the groups
# take another way: each worker writes {node id: group} into a folder the controller names
# in its workerinput, and the controller's scheduler (`pytest_xdist_make_scheduler`) reads
# that table when it distributes the tests, which is after every worker reported its
# collection. `pytest_runtest_logreport` checks afterwards that each group ran on one worker.
_GROUPS_DIR = "agentstream_xdist_groups_dir"
_GROUP_TABLE = pytest.StashKey[dict[str, str]]()
_GROUP_WORKERS = pytest.StashKey[dict[str, set[str]]]()


def _group_of(item: pytest.Item) -> str | None:
    names = set()
    for mark in item.iter_markers("xdist_group"):
        name = mark.args[0] if mark.args else mark.kwargs.get("name")
        if name not in XDIST_GROUPS:
            # a misspelt group would silently be a group of its own
            raise pytest.UsageError(
                f"{item.nodeid}: xdist_group {name!r} is none of {sorted(XDIST_GROUPS)}"
            )
        names.add(name)
    return "_".join(sorted(names)) or None  # several groups join, as in pytest-xdist


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    groups = {item.nodeid: g for item in items if (g := _group_of(item)) is not None}
    folder = getattr(config, "workerinput", {}).get(_GROUPS_DIR)
    if folder:
        out = Path(folder) / f"{config.workerinput['workerid']}.json"
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(groups), encoding="utf-8")
        tmp.replace(out)


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node: Any) -> None:
    """xdist controller, for each worker it starts: where to write the group table."""
    config = node.config
    if _GROUPS_DIR not in config.stash.get(_XDIST_STATE, {}):
        config.stash.setdefault(_XDIST_STATE, {})[_GROUPS_DIR] = tempfile.mkdtemp(
            prefix="agentstream-xdist-groups-"
        )
    node.workerinput[_GROUPS_DIR] = config.stash[_XDIST_STATE][_GROUPS_DIR]


def _group_table(config: pytest.Config) -> dict[str, str]:
    """xdist controller, once every worker has collected: node id -> group."""
    if _GROUP_TABLE not in config.stash:
        table: dict[str, str] = {}
        folder = config.stash.get(_XDIST_STATE, {}).get(_GROUPS_DIR)
        for written in sorted(Path(folder).glob("*.json")) if folder else ():
            table.update(json.loads(written.read_text(encoding="utf-8")))
        config.stash[_GROUP_TABLE] = table
    return config.stash[_GROUP_TABLE]


@pytest.hookimpl(tryfirst=True, optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    if config.getoption("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadGroupScheduling

    class TableGroupScheduling(LoadGroupScheduling):
        """LoadGroupScheduling whose groups come from the workers' table."""

        def _split_scope(self, nodeid: str) -> str:
            group = _group_table(config).get(nodeid)
            return group if group is not None else str(super()._split_scope(nodeid))

    return TableGroupScheduling(config, log)


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """xdist controller: note which worker ran each grouped test."""
    node = getattr(report, "node", None)
    if node is None or node.config.getoption("dist") != "loadgroup":
        return
    group = _group_table(node.config).get(report.nodeid)
    if group is not None:
        workers = node.config.stash.setdefault(_GROUP_WORKERS, {})
        workers.setdefault(group, set()).add(node.gateway.id)


def pytest_sessionfinish(session: pytest.Session) -> None:
    """xdist controller: a group that ran on two workers makes the run fail, loudly."""
    split = {g: w for g, w in session.config.stash.get(_GROUP_WORKERS, {}).items() if len(w) > 1}
    if split:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.ensure_newline()
            reporter.write_line(f"ERROR: xdist groups ran on several workers: {split}", red=True)
        session.exitstatus = pytest.ExitCode.INTERNAL_ERROR


#: controller only: which shared brokers were running before the run (never ours to stop)
_RUNNING_BEFORE = pytest.StashKey[dict[str, bool]]()
#: controller only: the folder of the group tables
_XDIST_STATE = pytest.StashKey[dict[str, str]]()


def pytest_sessionstart(session: pytest.Session) -> None:
    """xdist controller, before the workers start: note which shared brokers run already,
    and create their state folders, so that the top level of var/ stays as it is while
    tests run (tests/unit/test_cli_mistakes.py checks that `--help` adds nothing there)."""
    config = session.config
    if not _xdist_controller(config):
        return
    from agentstream.infra.kafka import launcher

    external = launcher.external_bootstrap() is not None
    secured = _secured_broker()
    config.stash[_RUNNING_BEFORE] = {
        "plain": external or bool(launcher.status(_test_broker_config())["running"]),
        "secured": secured.running(),
    }
    (REPO / "var" / "test-kafka").mkdir(parents=True, exist_ok=True)
    secured.root.mkdir(mode=0o700, parents=True, exist_ok=True)


def pytest_unconfigure(config: pytest.Config) -> None:
    """xdist controller, once every worker has ended: stop the shared brokers a worker
    started in this run, as a serial session's fixtures do."""
    folder = config.stash.get(_XDIST_STATE, {}).get(_GROUPS_DIR)
    if folder:
        shutil.rmtree(folder, ignore_errors=True)
    before = config.stash.get(_RUNNING_BEFORE, None)
    if before is None or _keep_brokers():
        return
    from agentstream.infra.kafka import launcher

    if not before["plain"]:
        launcher.stop(_test_broker_config())
    if not before["secured"]:
        _secured_broker().stop()


@pytest.fixture(scope="session")
def kafka_bootstrap(request: pytest.FixtureRequest) -> Iterator[str]:
    from agentstream.infra.kafka import launcher

    external = launcher.external_bootstrap()
    if external:
        yield external
        return
    cfg = _test_broker_config()
    already_running = launcher.status(cfg)["running"]
    # A failure here is an error in every integration test, by design: no broker, no pass.
    # Under xdist, workers race here: start() serialises them and reuses a running broker.
    bootstrap = launcher.start(cfg)
    yield bootstrap
    # Stop only a broker this session started: another session may be using it. An xdist
    # worker never stops it: the other workers may still use it (the controller stops it).
    if not already_running and not _keep_brokers() and not _xdist_worker(request.config):
        launcher.stop(cfg)


@pytest.fixture
def ns() -> str:
    """A unique namespace for one test's topics and app id."""
    return f"t{uuid.uuid4().hex[:10]}"


@pytest.fixture
def settings_env(kafka_bootstrap: str, ns: str, tmp_path: Path) -> Iterator[dict[str, str]]:
    """Environment for a worker/CLI subprocess isolated to this test; the test's topics
    (catalogue and changelogs) are deleted afterwards so the broker stays small.

    Its keychain (an encrypted-file keyring in `tmp_path`) holds web view tokens, as an
    operator would create them: read and admin tokens for the test's own HTTP clients
    (`tests.support.web_tokens`, `web_client`), the admin one also as the CLI's
    `web.token`, and a cluster token for the workers' forwarded lookups."""
    from agentstream.streams.settings import child_environ
    from tests.support import with_web_tokens

    env = child_environ(os.environ)
    env.update(
        {
            "AGENTSTREAM_KAFKA_BOOTSTRAP": kafka_bootstrap,
            "AGENTSTREAM_TOPIC_PREFIX": f"{ns}.",
            "AGENTSTREAM_APP_ID": f"{ns}-app",
            "AGENTSTREAM_DATA_DIR": str(tmp_path / "worker"),
            "AGENTSTREAM_TOPIC_PARTITIONS": "2",
            "AGENTSTREAM_WEB_PORT": str(_free_port()),
            "AGENTSTREAM_LOG_LEVEL": "INFO",
            "AGENTSTREAM_STANDBY_REPLICAS": "0",
            "PYTHONPATH": str(REPO),
        }
    )
    env = with_web_tokens(env, tmp_path)
    yield env
    asyncio.run(_delete_topics(kafka_bootstrap, ns))


async def _delete_topics(bootstrap: str, ns: str) -> None:
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        await admin.start()
        mine = [t for t in await admin.list_topics() if t.startswith(ns)]
        if mine:
            await admin.delete_topics(mine)
    except Exception as exc:  # cleanup must not turn a passing test red
        print(f"topic cleanup for {ns} failed: {exc!r}")
    finally:
        await admin.close()


def _free_port() -> int:
    """A port for a worker's web views, which a test may restart on it."""
    from tests.support import restartable_port

    return restartable_port()


# Imported here, not at the top, so that this fixture stays one block of its own.
from agentstream.infra.kafka.secured import SecuredKafka  # noqa: E402


def _secured_broker() -> SecuredKafka:
    return SecuredKafka(REPO / "var" / "test-kafka-secured", port_base=TEST_KAFKA_PORT + 100)


@pytest.fixture(scope="session")
def secured_kafka(request: pytest.FixtureRequest) -> Iterator[SecuredKafka]:
    """A secured single-node broker for the TLS/SASL/ACL tests (infra/kafka/secured.py):
    mutual TLS on `ssl_bootstrap`, SCRAM-SHA-256/512 on `sasl_ssl_bootstrap`, ACLs enforced,
    no PLAINTEXT listener. Ports from AGENTSTREAM_TEST_KAFKA_PORT + 100 upward, state in
    var/test-kafka-secured/. Like `kafka_bootstrap`, it is stopped at the end unless it
    was already running or AGENTSTREAM_TEST_KEEP_BROKER=1 (under xdist by the controller),
    and a broker that cannot start is an error in every test that uses it."""
    kafka = _secured_broker()
    already_running = kafka.running()
    kafka.start()  # idempotent, under a file lock: xdist workers share one broker
    yield kafka
    if not already_running and not _keep_brokers() and not _xdist_worker(request.config):
        kafka.stop()
