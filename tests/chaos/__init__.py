"""Fault-injection suite: `python -m tests.chaos --help`.

`checker` (pure: lost, duplicates, order, rebuild and audit verdicts), `load` (the input
producer), `collect` (read_committed follower and group assignment), `cluster` (brokers and
workers the suite owns), `harness` (one run), `scenarios` (the faults and the registry),
`report`, `runner` (the command line)."""
