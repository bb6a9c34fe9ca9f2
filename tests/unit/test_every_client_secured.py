"""No Kafka client of the product is built outside `streams.kafka_security`: a producer,
consumer or admin client constructed anywhere else would connect without the TLS/SASL
settings (as every one of them did before that module existed).

The bench's peers stage runs other client libraries (confluent-kafka, Quix Streams), which
`streams.kafka_security` cannot build. Their clients are allowed only in the peer runners,
and only because those take their bootstrap from `bench.peers_common.peer_env`, which
refuses TLS/SASL settings instead of connecting in plaintext."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CLIENTS = {"AIOKafkaProducer", "AIOKafkaConsumer", "AIOKafkaAdminClient", "KafkaAdminClient"}
ALLOWED = {"streams/kafka_security.py"}
#: confluent-kafka's and Quix Streams' client classes
PEER_CLIENTS = {"Producer", "Consumer", "AdminClient", "Application"}
PEER_RUNNERS = {"bench/peer_quix.py", "bench/peer_samework.py"}


def _constructions(path: Path, root: Path = REPO, clients: set[str] = CLIENTS) -> list[str]:
    tree = ast.parse(path.read_text(), str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            name = getattr(node.func, "id", None) or getattr(node.func, "attr", None)
            if name in clients:
                found.append(f"{path.relative_to(root)}:{node.lineno} {name}(...)")
    return found


def test_only_kafka_security_builds_kafka_clients() -> None:
    offenders = []
    for package in ("schemas", "streams", "agents", "bench"):
        for path in sorted((REPO / package).rglob("*.py")):
            if str(path.relative_to(REPO)) not in ALLOWED:
                offenders += _constructions(path)
    assert not offenders, "build clients with streams.kafka_security.new_*: " + ", ".join(offenders)


def test_peer_libraries_build_clients_only_in_the_guarded_peer_runners() -> None:
    offenders = []
    for package in ("schemas", "streams", "agents", "bench"):
        for path in sorted((REPO / package).rglob("*.py")):
            if str(path.relative_to(REPO)) not in ALLOWED | PEER_RUNNERS:
                offenders += _constructions(path, clients=PEER_CLIENTS)
    assert not offenders, "confluent-kafka / Quix clients outside the peer runners: " + ", ".join(
        offenders
    )
    for runner in sorted(PEER_RUNNERS):
        path = REPO / runner
        assert _constructions(path, clients=PEER_CLIENTS), f"{runner} builds no client any more"
        calls = {
            getattr(node.func, "id", None)
            for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, ast.Call)
        }
        assert "peer_env" in calls, f"{runner} must take its bootstrap from peer_env"


def test_the_check_sees_a_construction(tmp_path: Path) -> None:
    probe = tmp_path / "probe.py"
    probe.write_text(
        "import aiokafka\nfrom aiokafka.admin import AIOKafkaAdminClient\n"
        "c = aiokafka.AIOKafkaConsumer(bootstrap_servers='x')\n"
        "a = AIOKafkaAdminClient(bootstrap_servers='x')\n"
    )
    assert _constructions(probe, tmp_path) == [
        "probe.py:3 AIOKafkaConsumer(...)",
        "probe.py:4 AIOKafkaAdminClient(...)",
    ]
