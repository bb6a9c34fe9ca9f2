"""``python -m agentstream.infra.toxiproxy install|start|stop|status [--port N]``.

``install`` builds the pinned Toxiproxy once into the cache and prints the path
(exit 1 with one line on stderr when Go is missing or too old); ``start`` runs the
server on ``127.0.0.1:<port>`` (default 8474, state in ``var/toxiproxy/``);
``status`` exits 3 when it is not running.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from agentstream.infra.toxiproxy import server


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` and run one command; returns the exit code."""
    parser = argparse.ArgumentParser(prog="python -m agentstream.infra.toxiproxy")
    parser.add_argument("command", choices=["install", "start", "stop", "status"])
    parser.add_argument("--port", type=int, default=server.DEFAULT_API_PORT, help="API port")
    args = parser.parse_args(argv)
    cfg = server.ServerConfig(port=args.port)
    try:
        if args.command == "install":
            print(server.install())
            return 0
        if args.command == "start":
            print(f"Toxiproxy {server.TOXIPROXY_VERSION} API at {server.start_server(cfg)}")
            return 0
        if args.command == "stop":
            print("stopped" if server.stop_server(cfg) else "Toxiproxy was not running")
            return 0
        pid = server.server_pid(cfg)
        print(f"running, pid {pid}, API {cfg.api_url}" if pid else "not running")
        return 0 if pid else 3
    except server.ToxiproxyError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
