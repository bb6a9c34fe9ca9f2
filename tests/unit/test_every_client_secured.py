"""No Kafka client of the product is built outside `streams.kafka_security`: a producer,
consumer or admin client constructed anywhere else would connect without the TLS/SASL
settings (as every one of them did before that module existed)."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CLIENTS = {"AIOKafkaProducer", "AIOKafkaConsumer", "AIOKafkaAdminClient", "KafkaAdminClient"}
ALLOWED = {"streams/kafka_security.py"}


def _constructions(path: Path, root: Path = REPO) -> list[str]:
    tree = ast.parse(path.read_text(), str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            name = getattr(node.func, "id", None) or getattr(node.func, "attr", None)
            if name in CLIENTS:
                found.append(f"{path.relative_to(root)}:{node.lineno} {name}(...)")
    return found


def test_only_kafka_security_builds_kafka_clients() -> None:
    offenders = []
    for package in ("schemas", "streams", "agents", "bench"):
        for path in sorted((REPO / package).rglob("*.py")):
            if str(path.relative_to(REPO)) not in ALLOWED:
                offenders += _constructions(path)
    assert not offenders, "build clients with streams.kafka_security.new_*: " + ", ".join(offenders)


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
