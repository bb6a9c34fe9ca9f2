"""``python -m infra.kafka start|stop|status|fetch``: manage the local Kafka broker.

A thin shell over :mod:`infra.kafka.launcher`; settings come from the
``AGENTSTREAM_KAFKA_*`` environment variables.  Exit codes: 0 success, 1 failure,
3 for ``status`` when the broker is not running (the LSB convention, so scripts can
test it).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence

from infra.kafka import launcher


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` and run one command; returns the process exit code."""
    parser = argparse.ArgumentParser(
        prog="python -m infra.kafka",
        description="Run a local single-node Apache Kafka broker (KRaft) without Docker.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("start", help="start the broker (fetching jars on first use)")
    sub.add_parser("stop", help="stop the broker started by 'start'")
    status_parser = sub.add_parser("status", help="show whether the broker runs")
    status_parser.add_argument("--json", action="store_true", help="machine-readable output")
    sub.add_parser("fetch", help="only download the Kafka jars into the cache")
    args = parser.parse_args(argv)

    try:
        if args.command == "start":
            return _start()
        if args.command == "stop":
            return _stop()
        if args.command == "fetch":
            cfg = launcher.BrokerConfig.from_env()
            libs = launcher.fetch_jars(cfg.version)
            print(f"Kafka {cfg.version} jars are in {libs}")
            return 0
        info = launcher.status()
        print(json.dumps(info, indent=2) if args.json else launcher.format_status(info))
        return 0 if info["running"] else 3
    except launcher.BrokerStartError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except ValueError as exc:  # bad AGENTSTREAM_KAFKA_* value
        print(f"error: {exc}", file=sys.stderr)
        return 1


def _start() -> int:
    external = launcher.external_bootstrap()
    if external is not None:
        print(f"Using external Kafka cluster at {external} ({launcher.ENV_BOOTSTRAP} is set).")
        print("Nothing to start.")
        return 0
    cfg = launcher.BrokerConfig.from_env()
    already = launcher.status(cfg)
    if already["running"]:
        print(f"Kafka {cfg.version} is already running at {cfg.bootstrap} (pid {already['pid']}).")
        launcher.start(cfg)  # waits until it answers, if it is still starting
        return 0
    print(f"Starting Kafka {cfg.version} at {cfg.bootstrap} (log: {cfg.log_file}) ...")
    began = time.monotonic()
    bootstrap = launcher.start(cfg)
    print(f"Kafka is ready at {bootstrap} after {time.monotonic() - began:.1f}s.")
    return 0


def _stop() -> int:
    external = launcher.external_bootstrap()
    if external is not None:
        print(f"Using external Kafka cluster at {external}; not stopping it.")
        return 0
    cfg = launcher.BrokerConfig.from_env()
    if launcher.stop(cfg):
        print(f"Kafka at {cfg.bootstrap} stopped.")
    else:
        print("Kafka was not running.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
