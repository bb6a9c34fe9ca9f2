"""Run by the peers stage with the peers' virtualenv's python before any runner starts:
shows that the runners do the pipeline's work there.

Reads a JSON list of encoded events (as text) on stdin and prints one JSON object:
``outputs`` (`work` of each, as text: the stage requires them byte-equal to the
pipeline environment's), ``work_us`` (`work` per event, best of five rounds),
``agentstream`` (where the schemas were imported from: the stage requires its own
checkout) and ``versions`` of what differs between the two environments.

Run as ``python -m bench.peers_probe``.
"""

from __future__ import annotations

import json
import sys
from importlib.metadata import PackageNotFoundError, version


def main() -> None:
    import agentstream
    from bench.peers_common import work, work_us

    values = [v.encode() for v in json.load(sys.stdin)]
    outputs = [work(v).decode() for v in values]
    packages = ("pydantic", "pydantic-core", "orjson", "quixstreams", "confluent-kafka")
    result = {
        "outputs": outputs,
        "work_us": work_us(values),
        "agentstream": agentstream.__file__,
        "versions": {name: _version(name) for name in packages},
    }
    json.dump(result, sys.stdout)


def _version(name: str) -> str | None:
    """The installed version, or None: the probe also runs in the project's own
    environment (the pipeline's side of the comparison), which has no peers installed."""
    try:
        return version(name)
    except PackageNotFoundError:
        return None


if __name__ == "__main__":
    main()
