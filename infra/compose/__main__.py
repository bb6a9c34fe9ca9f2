"""``python -m agentstream.infra.compose init|check [--dir DIR]``: the files the compose profile
``cluster`` mounts (see `infra.compose.material` and docs/deploy.md)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from agentstream.infra.compose.material import (
    DEFAULT_DIR,
    OPERATOR_ENV_FILE,
    MaterialError,
    check,
    init,
)

NEXT_STEPS = """\
next (docs/deploy.md): Prometheus' token, a check, then up
  AGENTSTREAM_SECRET_SOURCES=dir AGENTSTREAM_SECRETS_DIR={root}/secrets \\
    agentstream web token create --scope read --name prometheus > {root}/secrets/prometheus_token
  python -m agentstream.infra.compose check --dir {root}
  docker compose -f docker-compose.kafka.yml --profile cluster up -d --build
the host CLI against the cluster: . {root}/{env}"""


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m agentstream.infra.compose", description=__doc__
    )
    parser.add_argument("command", choices=("init", "check"))
    parser.add_argument(
        "--dir", type=Path, default=DEFAULT_DIR, help=f"where the files live ({DEFAULT_DIR})"
    )
    args = parser.parse_args(argv)
    root: Path = args.dir
    if args.command == "init":
        try:
            made = init(root)
        except MaterialError as exc:
            print(f"init: {exc}", file=sys.stderr)
            return 1
        for name in made:
            print(f"made {root / name}")
        if not made:
            print(f"nothing to make: {root} has every file init makes")
        print(NEXT_STEPS.format(root=root, env=OPERATOR_ENV_FILE))
        return 0
    report = check(root)
    for line in report.fixed:
        print(f"mode fixed: {line}")
    for line in report.problems:
        print(f"problem: {line}", file=sys.stderr)
    if report.problems:
        return 1
    print(f"{root}: every file the compose profile `cluster` mounts is there and valid")
    return 0


if __name__ == "__main__":
    sys.exit(main())
