"""What a new user's common mistakes get from the CLI: one clear message, the exit code
docs/cli.md documents (1 rejected input or pipeline error, 2 usage or configuration), and
never a traceback. `--help` needs no settings and touches nothing.

The CLI runs as a subprocess (`python -m agentstream`), as a user runs it, in a directory and
HOME of its own, pointed at a local port where no broker listens.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click
import pytest

REPO = Path(__file__).resolve().parents[2]

VALID_MESSAGE = '{"message_id": "m1", "sender_id": "a1", "recipient_id": "a2", "content": "hi"}'


@dataclass(frozen=True)
class Mistake:
    id: str
    args: tuple[str, ...]
    expect: tuple[str, ...]  # substrings of stdout + stderr
    code: int
    env: dict[str, str] = field(default_factory=dict)
    stdin: str = ""


NO_BROKER = "no broker at 127.0.0.1:{port}"

MISTAKES = [
    # -- found by a sweep of the CLI: a traceback or a wait where one line belongs -------
    Mistake(
        "bootstrap-empty-label",
        ("topics", "list"),
        ("Error: AGENTSTREAM_KAFKA_BOOTSTRAP='kafka..local:9092'", "valid name"),
        2,
        {"AGENTSTREAM_KAFKA_BOOTSTRAP": "kafka..local:9092"},
    ),
    Mistake(
        "bootstrap-long-label",
        ("topics", "list"),
        ("Error: AGENTSTREAM_KAFKA_BOOTSTRAP=", "valid name"),
        2,
        {"AGENTSTREAM_KAFKA_BOOTSTRAP": "a" * 64 + ":9092"},
    ),
    Mistake(
        "web-port-out-of-range",
        ("agents", "status"),
        ("Error: AGENTSTREAM_WEB_PORT='99999'", "65535"),
        2,
        {"AGENTSTREAM_WEB_PORT": "99999"},
    ),
    Mistake(
        "keyring-file-is-a-directory",
        ("credentials", "get", "--secret", "x"),
        ("AGENTSTREAM_KEYRING_FILE=", "is a directory"),
        1,
        {"AGENTSTREAM_KEYRING_FILE": "."},  # the mistakes' working directory
    ),
    Mistake(
        # "cannot read keyring file ...: JSONDecodeError"
        "keyring-file-empty",
        ("credentials", "get", "--secret", "x"),
        ("Error: CredentialsError: keyring file ", "empty.json is empty, not an agentstream"),
        1,
        {"AGENTSTREAM_KEYRING_FILE": "empty.json"},
    ),
    Mistake(
        # read as utf-8-sig: a BOM (a Windows editor's) stayed in the first key's id
        "audit-trusted-keys-bom",
        ("audit", "verify", "--trusted-keys", "bom-keys.txt"),
        ("Invalid value for --trust-key/--trusted-keys: key 'k1': not base64",),
        2,
    ),
    Mistake(
        "data-dir-is-a-file",
        ("config",),
        ("Error: AGENTSTREAM_DATA_DIR=", "not a directory"),
        2,
        {"AGENTSTREAM_DATA_DIR": "good.yaml"},  # a file of the mistakes' directory
    ),
    Mistake(
        # "the app cannot be built from these settings: [Errno 20] Not a directory:
        # 'good.yaml/worker'" (the data dir left to its default, below the state dir)
        "state-dir-is-a-file",
        ("topics", "list"),
        ("Error: AGENTSTREAM_STATE_DIR='good.yaml': not a directory",),
        2,
        {"AGENTSTREAM_STATE_DIR": "good.yaml", "AGENTSTREAM_DATA_DIR": ""},
    ),
    Mistake(
        # "Error: CredentialsError: secret source dir failed: NotADirectoryError", exit 1
        "secrets-dir-is-a-file",
        ("credentials", "get", "--secret", "x"),
        ("Error: AGENTSTREAM_SECRETS_DIR='good.yaml': not a directory",),
        2,
        {"AGENTSTREAM_SECRET_SOURCES": "dir", "AGENTSTREAM_SECRETS_DIR": "good.yaml"},
    ),
    Mistake(
        "top-url-port-out-of-range",
        ("top", "--once", "--url", "http://127.0.0.1:99999"),
        ("Invalid value for '--url'", "is not a URL"),
        2,
    ),
    Mistake(
        # it was exit 1, as if a pipeline had failed
        "rebuild-unknown-table",
        ("rebuild", "nosuchtable"),
        ("Invalid value for 'TABLE': unknown table 'nosuchtable' (known: ", "security_policies"),
        2,
    ),
    Mistake(
        # not checked: the worker was asked for an empty range
        "comms-until-before-since",
        ("comms", "--since", "-1h", "--until", "-2h"),
        ("--until -2h is before --since -1h",),
        2,
    ),
    Mistake(
        # "no worker answering at nothttp/checkpoints: Request URL is missing ...", exit 1,
        # where `top` said it is no URL
        "checkpoints-take-url-without-scheme",
        ("checkpoints", "--take", "--url", "nothttp"),
        ("Invalid value for '--url': 'nothttp' is not a URL (http://HOST:PORT)",),
        2,
    ),
    Mistake(
        "comms-since-not-a-time",
        ("comms", "--since", "yesterday"),
        ("Invalid value for '--since'",),
        2,
    ),
    Mistake(
        "tail-timeout-nan",
        ("tail", "agent.messages", "--timeout", "nan"),
        ("a finite number of seconds",),
        2,
    ),
    Mistake(
        "web-host-ipv6-literal",
        ("agents", "status"),
        ("Error: no worker answering at http://[::1]:",),
        1,
        {"AGENTSTREAM_WEB_HOST": "::1", "AGENTSTREAM_WEB_PORT": "1"},
    ),
    *(
        # sent the request, then gave up at once ("no response within nans")
        Mistake(f"llm-ask-timeout-{v}", ("llm", "ask", "hi", "--timeout", v), (text,), 2)
        for v, text in (
            ("nan", "Invalid value for '--timeout': nan: a finite number of seconds"),
            ("0", "Invalid value for '--timeout': 0.0 is not in the range x>0."),
            ("-1", "Invalid value for '--timeout': -1.0 is not in the range x>0."),
        )
    ),
    *(
        # failed only after the broker and the worker started, with a traceback
        Mistake(f"demo{'-'.join(args)}", ("demo", *args), (text,), 2)
        for args, text in (
            (("--rate", "0"), "Invalid value for '--rate': 0.0 is not in the range x>0."),
            (("--rate", "nan"), "Invalid value for '--rate': nan: a finite number"),
            (("--agents", "0"), "Invalid value for '--agents': 0 is not in the range x>=1."),
            (("--duration", "inf"), "Invalid value for '--duration': inf: a finite number"),
        )
    ),
    Mistake(
        # a value piped in without --stdin: GetPassWarning lines, then "Aborted!", exit 1
        "credentials-set-piped-without-stdin",
        ("credentials", "set", "--secret", "x"),
        ("Error: stdin is not a terminal: to read the value from it, add --stdin",),
        2,
        stdin="v\n",
    ),
    Mistake(
        # it said "No such command 'policy'", where `topics list` named the typo
        "agents-typo-hides-no-command",
        ("policy", "list"),
        ("Error: AGENTSTREAM_AGENTS='securty'", "did you mean 'security'?"),
        2,
        {"AGENTSTREAM_AGENTS": "securty"},
    ),
    # -- settings: a command ends with every bad variable named, exit 2 ------------------
    Mistake(
        "setting-not-an-int",
        ("topics", "list"),
        ("Error: AGENTSTREAM_TOPIC_PARTITIONS='zero': Input should be a valid integer",),
        2,
        {"AGENTSTREAM_TOPIC_PARTITIONS": "zero"},
    ),
    Mistake(
        "setting-not-a-bool",
        ("policy", "list"),
        ("Error: AGENTSTREAM_SECURITY_ENABLED='maybe'",),
        2,
        {"AGENTSTREAM_SECURITY_ENABLED": "maybe"},
    ),
    Mistake(
        "setting-not-a-choice",
        ("config",),
        ("Error: AGENTSTREAM_PROCESSING_GUARANTEE='maybe_once'", "'exactly_once'"),
        2,
        {"AGENTSTREAM_PROCESSING_GUARANTEE": "maybe_once"},
    ),
    Mistake(
        "setting-out-of-range",
        ("tail", "agent.messages"),
        ("Error: AGENTSTREAM_KAFKA_CONNECT_TIMEOUT_S='0': Input should be greater than 0",),
        2,
        {"AGENTSTREAM_KAFKA_CONNECT_TIMEOUT_S": "0"},
    ),
    Mistake(
        "two-bad-settings-both-named",
        ("kafka", "status"),
        ("Error: AGENTSTREAM_TOPIC_PARTITIONS='0'", "Error: AGENTSTREAM_WEB_PORT='http'"),
        2,
        {"AGENTSTREAM_TOPIC_PARTITIONS": "0", "AGENTSTREAM_WEB_PORT": "http"},
    ),
    Mistake(
        "bad-secret-sources",
        ("credentials", "get"),
        ("Error: AGENTSTREAM_SECRET_SOURCES='vault': a comma-separated order of keychain",),
        2,
        {"AGENTSTREAM_SECRET_SOURCES": "vault"},
    ),
    Mistake(
        # the keychain's CredentialsError, exit 1, once a command asked it
        "keyring-backend-unknown",
        ("credentials", "get", "--secret", "x"),
        ("Error: AGENTSTREAM_KEYRING_BACKEND='nosuch': is not on the allow-list",),
        2,
        {"AGENTSTREAM_KEYRING_BACKEND": "nosuch"},
    ),
    Mistake(
        "sasl-without-username",
        ("topics", "list"),
        (
            "Error: AGENTSTREAM_KAFKA_SASL_USERNAME is required with "
            "AGENTSTREAM_KAFKA_SECURITY_PROTOCOL=SASL_SSL",
        ),
        2,
        {
            "AGENTSTREAM_KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
            "AGENTSTREAM_KAFKA_SASL_MECHANISM": "PLAIN",
        },
    ),
    Mistake(
        "bad-setting-worker",
        ("worker",),
        ("Error: AGENTSTREAM_BATCH_MAX='-1'",),
        2,
        {"AGENTSTREAM_BATCH_MAX": "-1"},
    ),
    Mistake(
        "worker-log-level-unknown",
        ("worker",),
        ("Error: AGENTSTREAM_LOG_LEVEL='verbose': one of DEBUG, INFO, WARNING",),
        2,
        {"AGENTSTREAM_LOG_LEVEL": "verbose"},
    ),
    Mistake(
        "delivery-path-unknown",
        ("worker",),
        ("Error: AGENTSTREAM_DELIVERY='batch': Input should be 'native' or 'per-record'",),
        2,
        {"AGENTSTREAM_DELIVERY": "batch"},
    ),
    Mistake(
        # the experimental switch is gone: a worker that still has it says which path runs
        "retired-delivery-switch",
        ("worker",),
        (
            "warning: AGENTSTREAM_EXPERIMENTAL_BATCH_DELIVERY is no longer read: this worker "
            "runs the per-record delivery path (AGENTSTREAM_DELIVERY, default native)",
            NO_BROKER,
        ),
        1,
        {"AGENTSTREAM_EXPERIMENTAL_BATCH_DELIVERY": "1", "AGENTSTREAM_DELIVERY": "per-record"},
    ),
    Mistake(
        "ca-file-missing",
        ("topics", "list"),
        ("Error: AGENTSTREAM_KAFKA_SSL_CAFILE='nope.pem': no such file",),
        2,
        {"AGENTSTREAM_KAFKA_SECURITY_PROTOCOL": "SSL", "AGENTSTREAM_KAFKA_SSL_CAFILE": "nope.pem"},
    ),
    Mistake(
        "web-certificate-missing",
        ("worker",),
        (
            "Error: AGENTSTREAM_WEB_TLS_CERTFILE='web.pem': no such file",
            "Error: AGENTSTREAM_WEB_TLS_KEYFILE='web.key': no such file",
        ),
        2,
        {"AGENTSTREAM_WEB_TLS_CERTFILE": "web.pem", "AGENTSTREAM_WEB_TLS_KEYFILE": "web.key"},
    ),
    Mistake(
        "web-certificate-not-pem",
        ("topics", "list"),
        (
            "Error: AGENTSTREAM_WEB_TLS_CERTFILE/KEYFILE: cannot load the web server's "
            "certificate and key ([SSL] PEM lib): both must be PEM files",
        ),
        2,
        {"AGENTSTREAM_WEB_TLS_CERTFILE": "bad.yaml", "AGENTSTREAM_WEB_TLS_KEYFILE": "bad.yaml"},
    ),
    # -- usage: exit 2 before anything connects -------------------------------------------
    Mistake("unknown-command", ("topic", "list"), ("No such command 'topic'",), 2),
    Mistake(
        "bad-option-value",
        ("tail", "agent.messages", "--max", "zero"),
        ("Invalid value for '--max'",),
        2,
    ),
    Mistake("worker-bad-option", ("worker", "--loglevel", "loud"), ("'--loglevel'",), 2),
    Mistake(
        "bad-time",
        ("replay", "--topics", "agent.messages", "--since", "yesterday"),
        ("cannot parse time 'yesterday'",),
        2,
    ),
    Mistake(
        "until-before-since",
        ("audit", "verify", "--since", "-1h", "--until", "-2h"),
        ("--until -2h is before --since -1h",),
        2,
    ),
    Mistake(
        "llm-option-out-of-bounds",
        ("llm", "ask", "hi", "--temperature", "9"),
        ("Invalid value for '--temperature'",),
        2,
    ),
    Mistake(
        "llm-ask-tools-missing",
        ("llm", "ask", "hi", "--tools", "no-such-tools.json"),
        ("Invalid value for '--tools': no-such-tools.json: No such file or directory",),
        2,
    ),
    Mistake(
        "llm-ask-tools-not-a-list",
        ("llm", "ask", "hi", "--tools", "good.yaml"),
        ("Invalid value for '--tools': good.yaml: expected a list of tools",),
        2,
    ),
    Mistake(
        "llm-ask-tool-bad-name",
        ("llm", "ask", "hi", "--tools", "tools-bad-name.yaml"),
        (
            "Invalid value for '--tools': tools-bad-name.yaml: tool 2: function.name: "
            "Value error, tool name 'get weather': 1-64 letters, digits, _ or -",
        ),
        2,
    ),
    Mistake(
        "llm-ask-tool-choice-unknown",
        ("llm", "ask", "hi", "--tools", "tools.yaml", "--tool-choice", "get_wether"),
        ("Invalid value for '--tool-choice': 'get_wether' is not auto, none, required or",),
        2,
    ),
    Mistake(
        "llm-ask-tool-choice-without-tools",
        ("llm", "ask", "hi", "--tool-choice", "auto"),
        ("Invalid value for '--tool-choice': needs --tools",),
        2,
    ),
    Mistake(
        "llm-ask-schema-not-json",
        ("llm", "ask", "hi", "--schema", "bad.yaml"),
        ("Invalid value for '--schema': bad.yaml: not JSON or YAML:",),
        2,
    ),
    Mistake(
        "llm-ask-empty-model",
        ("llm", "ask", "hi", "--model", ""),
        ("Invalid value for '--model'",),
        2,
    ),
    Mistake(
        "llm-providers-alias-misspelt",
        ("llm", "providers"),
        (
            "Error: providers file providers-typo.yaml: provider 'openai' maps 'fsat', which "
            "is not one of the aliases (did you mean 'fast'?)",
        ),
        2,
        {"AGENTSTREAM_LLM_PROVIDERS_FILE": "providers-typo.yaml"},
    ),
    Mistake(
        "llm-providers-unknown-key",
        ("llm", "providers"),
        (
            "Error: providers file providers-key.yaml: unknown top-level key 'alias' "
            "(known: providers, aliases, default_alias, prices, budgets)",
        ),
        2,
        {"AGENTSTREAM_LLM_PROVIDERS_FILE": "providers-key.yaml"},
    ),
    Mistake(
        "llm-providers-default-not-an-alias",
        ("llm", "providers", "--check"),
        (
            "Error: providers file providers-default.yaml: default_alias: 'gpt-4o-mini' is "
            "not one of the aliases",
        ),
        2,
        {"AGENTSTREAM_LLM_PROVIDERS_FILE": "providers-default.yaml"},
    ),
    Mistake(
        "llm-providers-kind-misspelt",
        ("llm", "providers"),
        (
            "Error: providers file providers-kind.yaml: provider 'claude': kind: Input should "
            "be 'openai', 'azure', 'vllm', 'llamacpp', 'lmstudio', 'ollama', 'anthropic' or "
            "'local'",
        ),
        2,
        {"AGENTSTREAM_LLM_PROVIDERS_FILE": "providers-kind.yaml"},
    ),
    Mistake(
        "llm-providers-anthropic-max-tokens",
        ("llm", "providers"),
        (
            "Error: providers file providers-max.yaml: provider 'claude': max_tokens: Input "
            "should be greater than or equal to 1",
        ),
        2,
        {"AGENTSTREAM_LLM_PROVIDERS_FILE": "providers-max.yaml"},
    ),
    Mistake(
        "llm-prices-unknown-provider",
        ("llm", "providers"),
        ("Error: providers file providers-prices.yaml: prices: unknown provider 'opneai'",),
        2,
        {"AGENTSTREAM_LLM_PROVIDERS_FILE": "providers-prices.yaml"},
    ),
    Mistake(
        "llm-budget-negative",
        ("llm", "providers"),
        ("Error: providers file providers-negative.yaml: budgets[0].max_cost_usd: -5 is negative",),
        2,
        {"AGENTSTREAM_LLM_PROVIDERS_FILE": "providers-negative.yaml"},
    ),
    Mistake(
        "llm-budget-bad-window",
        ("llm", "providers"),
        (
            "Error: providers file providers-window.yaml: budgets[0]: window '1w': 1h, 1d, "
            "30d or a number of seconds",
        ),
        2,
        {"AGENTSTREAM_LLM_PROVIDERS_FILE": "providers-window.yaml"},
    ),
    # -- files that are no text, or nested past any real one: one line naming them -------
    Mistake(
        "audit-trusted-keys-not-text",
        ("audit", "verify", "--trusted-keys", "binary.yaml"),
        ("Error: Invalid value for --trusted-keys: binary.yaml: not UTF-8 text (byte 0)",),
        2,
    ),
    Mistake(
        "llm-providers-file-not-text",
        ("llm", "providers"),
        ("Error: providers file binary.yaml is not valid YAML/JSON: not UTF-8 (byte 0)",),
        2,
        {"AGENTSTREAM_LLM_PROVIDERS_FILE": "binary.yaml"},
    ),
    Mistake(
        "llm-providers-file-nested-deeply",
        ("llm", "providers"),
        ("Error: providers file deep.json, line 1: nested too deeply (more than 64 levels)",),
        2,
        {"AGENTSTREAM_LLM_PROVIDERS_FILE": "deep.json"},
    ),
    Mistake(
        # another command: the warning names the file (it said only "maximum recursion
        # depth exceeded")
        "providers-file-nested-deeply-other-command",
        ("rebuild",),  # one that loads the agents (`schemas export` no longer does)
        (
            "warning: the agents did not all load: providers file deep.json, line 1: nested "
            "too deeply (more than 64 levels)",
            "name a TABLE or pass --all",
        ),
        2,
        {"AGENTSTREAM_LLM_PROVIDERS_FILE": "deep.json"},
    ),
    Mistake(
        "llm-ask-tools-nested-deeply",
        ("llm", "ask", "hi", "--tools", "deep.json"),
        ("Invalid value for '--tools': deep.json, line 1: nested too deeply",),
        2,
    ),
    Mistake(
        "llm-ask-schema-nested-deeply",
        ("llm", "ask", "hi", "--schema", "deep.yaml"),
        ("Invalid value for '--schema': deep.yaml, line 1: nested too deeply",),
        2,
    ),
    Mistake(
        "missing-policy-file",
        ("policy", "apply", "--dry-run", "missing.yaml"),
        ("'missing.yaml' does not exist",),
        2,
    ),
    Mistake(
        "missing-publish-file",
        ("publish", "agent.messages", "-f", "missing.jsonl"),
        ("'missing.jsonl' does not exist",),
        2,
    ),
    Mistake(
        "output-directory-missing",
        ("replay", "--topics", "agent.messages", "--out", "no/such/dir/out.jsonl"),
        ("no such directory",),
        2,
    ),
    Mistake(
        "replay-output-name-empty",
        ("replay", "--topics", "agent.messages", "--out", ""),
        ("Invalid value for '--out': an empty name (or '.') is a directory: name a file",),
        2,
    ),
    Mistake(
        "audit-report-output-name-empty",
        ("audit", "report", "--out", ""),
        ("Invalid value for '--out': an empty name (or '.') is a directory: name a file",),
        2,
    ),
    Mistake(
        "unknown-topic-publish",
        ("publish", "agent.mesages"),
        ("unknown topic 'agent.mesages' (did you mean 'agent.messages'?)",),
        2,
        stdin=VALID_MESSAGE,
    ),
    Mistake("unknown-topic-tail", ("tail", "nope"), ("unknown topic 'nope'",), 2),
    Mistake(
        "publish-type-not-on-topic",
        ("publish", "agent.messages", "--type", "llm.request"),
        ("'llm.request' does not go on agent.messages",),
        2,
    ),
    # -- rejected input: exit 1, and validated before (or without) any broker -------------
    Mistake(
        "malformed-json-to-publish",
        ("publish", "agent.messages"),
        ("line 1: JSONDecodeError", "sent 0 event(s) to agent.messages, 1 invalid line(s)"),
        1,
        stdin="{not json\n",
    ),
    Mistake(
        "publish-dry-run-offline",
        ("publish", "agent.messages", "--dry-run"),
        ("would send 1 event(s) to agent.messages, 1 invalid line(s)", "line 2: InvalidEvent"),
        1,
        stdin=VALID_MESSAGE + '\n{"message_id": "x"}\n',
    ),
    Mistake(
        # too big for the topic: reported as an invalid line with its number, the others
        # checked (it passed --dry-run, and a real run stopped the whole file at it)
        "publish-dry-run-event-too-big",
        ("publish", "agent.messages", "--dry-run"),
        (
            "line 2: InvalidEvent: the event is ",
            "more than AGENTSTREAM_MAX_EVENT_BYTES (1000000)",
            "line 3: JSONDecodeError",
            "would send 2 event(s) to agent.messages, 2 invalid line(s)",
        ),
        1,
        stdin=VALID_MESSAGE
        + "\n"
        + VALID_MESSAGE.replace('"hi"', '"' + "x" * 1_100_000 + '"')
        + "\n{bad\n"
        + VALID_MESSAGE
        + "\n",
    ),
    Mistake(
        "policy-file-bad-yaml",
        ("policy", "apply", "--dry-run", "bad.yaml"),
        ("Error: bad.yaml, line 2, column 8: not YAML or JSON: mapping values are not allowed",),
        1,
    ),
    Mistake(
        "policy-file-nested-deeply",
        ("policy", "apply", "--dry-run", "deep.json"),
        ("Error: deep.json, line 1: not a policy file: nested too deeply",),
        1,
    ),
    Mistake(
        "policy-file-invalid-policy",
        ("policy", "apply", "--dry-run", "invalid.yaml"),
        ("error: policy #1 (p1): max_message_size", "nothing published"),
        1,
    ),
    Mistake(
        "policy-config-fields",
        ("policy", "apply", "--dry-run", "config.yaml"),
        (
            "config: security enabled, default deny, anonymous_levels public, "
            "replay_window_s 60.0, rejected_redaction hash",
        ),
        0,
    ),
    Mistake(
        "policy-config-field-out-of-range",
        ("policy", "apply", "--dry-run", "config-bad.yaml"),
        ("error: config: replay_window_s: Input should be greater than 0", "nothing published"),
        1,
    ),
    Mistake(
        "policy-dry-run-needs-no-broker",
        ("policy", "apply", "--dry-run", "good.yaml"),
        ("valid p1", "nothing published (checked offline"),
        0,
    ),
    # -- options a Kafka user expects (kcat, kafka-console-consumer) ----------------------
    Mistake("bootstrap-without-value", ("-b",), ("Error: Option '-b' requires an argument.",), 2),
    *(
        # an empty variable is an unset one: `-b ""` read the default broker's address
        Mistake(f"bootstrap-empty-{i}", (*args, "topics", "list"), (f"Error: Option '{flag}'",), 2)
        for i, (args, flag) in enumerate(
            (
                (("-b", ""), "-b"),
                (("--bootstrap-server=",), "--bootstrap-server"),
                (("--bootstrap-server", " "), "--bootstrap-server"),
            )
        )
    ),
    *(
        # `admin keygen --id ""` made the default id's key; `--signing-key ""` stored a
        # key under an empty name
        Mistake(
            f"empty-name-{'-'.join(a.strip('-') for a in args[:2])}",
            args,
            (f"Invalid value for '{hint}': an empty value",),
            2,
        )
        for args, hint in (
            (("admin", "keygen", "--id", ""), "--id"),
            (("credentials", "set", "--signing-key", "", "--generate"), "--signing-key"),
            (("credentials", "get", "--secret", " "), "--secret"),
            (("audit", "worker-key", "publish", "--key-id", ""), "--key-id"),
            (("identity", "revoke", ""), "AGENT_ID"),
        )
    ),
    Mistake(
        "tail-offset-unknown",
        ("tail", "agent.messages", "--offset", "soon"),
        ("offset 'soon': 'beginning', 'end', an offset n, -n (the last n records",),
        2,
    ),
    Mistake(
        "tail-two-starts",
        ("tail", "agent.messages", "--from-beginning", "-o", "5"),
        ("--from-beginning and --offset: give one of them",),
        2,
    ),
    Mistake(
        "tail-group-and-partition",
        ("tail", "agent.messages", "--group", "g", "-p", "1"),
        ("--group: the group assigns the partitions",),
        2,
    ),
    Mistake(
        "replay-format-unknown",
        ("replay", "--topics", "agent.messages", "--format", "xml"),
        ("Invalid value for '--format': 'xml' is not one of 'json', 'pretty', 'raw'.",),
        2,
    ),
    Mistake(
        # -b wins over AGENTSTREAM_KAFKA_BOOTSTRAP (the closed port of the others)
        "bootstrap-option-is-used",
        ("-b", "127.0.0.1:1", "topics", "list"),
        ("Error: BrokerError: no broker at 127.0.0.1:1 (PLAINTEXT)",),
        1,
    ),
    # -- `top`: no worker, not a URL ----------------------------------------------------
    Mistake(
        "top-no-worker",
        ("top", "--url", "http://127.0.0.1:1"),
        ("Error: no worker answering at http://127.0.0.1:1/ui/api/stream",),
        1,
    ),
    Mistake(
        "top-url-without-scheme",
        ("top", "--url", "127.0.0.1:6066"),
        ("Invalid value for '--url': '127.0.0.1:6066' is not a URL (http://HOST:PORT)",),
        2,
    ),
    # -- the local broker's commands: the same lines and exit codes -----------------------
    Mistake(
        "kafka-secured-with-nodes",
        ("kafka", "start", "--secured", "--nodes", "3"),
        ("Error: --secured runs a single broker: drop --nodes",),
        2,
    ),
    Mistake(
        "kafka-nodes-not-a-number",
        ("kafka", "status"),
        ("Error: AGENTSTREAM_KAFKA_NODES='three' is not a number",),
        2,
        {"AGENTSTREAM_KAFKA_NODES": "three"},
    ),
    Mistake(
        "kafka-nodes-too-many",
        ("kafka", "status"),
        ("Error: 12 nodes: a local cluster has 1 to 9",),
        2,
        {"AGENTSTREAM_KAFKA_NODES": "12"},
    ),
    # -- signing without the admin key: a credentials setup problem, exit 2 ---------------
    Mistake(
        "worker-key-without-admin-key",
        ("audit", "worker-key", "publish"),
        ("Error: no admin key 'admin_key.", "nothing published"),
        2,
    ),
    Mistake(
        "policy-without-admin-key",
        ("policy", "apply", "good.yaml"),
        ("Error: no admin key 'admin_key.", "nothing published"),
        2,
    ),
    # -- no broker: one line naming it, with what to do, exit 1 ---------------------------
    *(
        Mistake(f"no-broker-{'-'.join(args[:2])}", args, (NO_BROKER,), 1, stdin=VALID_MESSAGE)
        for args in (
            ("policy", "list"),
            ("policy", "apply", "good.yaml"),  # an admin key is needed first: see below
            ("identity", "list"),
            ("audit", "verify"),
            ("rebuild", "--all"),
            ("replay", "--topics", "agent.messages"),
            ("tail", "agent.messages"),
            ("publish", "agent.messages"),
            ("topics", "list"),
            ("llm", "ask", "hi"),
            ("worker",),
        )
        if args[:2] != ("policy", "apply")
    ),
]


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def base_env(home: Path, bootstrap: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AGENTSTREAM_")}
    env.update(
        {
            "HOME": str(home),
            "PYTHONPATH": str(REPO),
            "AGENTSTREAM_KAFKA_BOOTSTRAP": bootstrap,
            "AGENTSTREAM_KAFKA_CONNECT_TIMEOUT_S": "10",
            "AGENTSTREAM_DATA_DIR": str(home / "data"),
            "AGENTSTREAM_KEYRING_BACKEND": "encrypted-file",
            "AGENTSTREAM_KEYRING_FILE": str(home / "keyring.json"),
            "AGENTSTREAM_KEYRING_PASSWORD": "test",
        }
    )
    return env


def agentstream(
    args: tuple[str, ...], env: dict[str, str], cwd: Path, stdin: str = ""
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agentstream", *args],
        env=env,
        cwd=cwd,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """Every mistake run once, a few at a time (each is a Python start-up)."""
    work = tmp_path_factory.mktemp("mistakes")
    (work / "bad.yaml").write_text("policy_id: p1\n  level: [\n")
    (work / "deep.json").write_text("[" * 100_000 + "]" * 100_000)
    (work / "deep.yaml").write_text("a: " + "[" * 50_000 + "]" * 50_000)
    (work / "binary.yaml").write_bytes(b"\xff\xfe\x00\x01binary")
    (work / "empty.json").write_bytes(b"")
    (work / "bom-keys.txt").write_bytes("\ufeffk1=bm90IGEga2V5\n".encode())
    (work / "invalid.yaml").write_text("policy_id: p1\nmax_message_size: -5\n")
    (work / "good.yaml").write_text('policy_id: p1\nlevel: "*"\n')
    (work / "config.yaml").write_text(
        "anonymous_levels: [public]\nreplay_window_s: 60\nrejected_redaction: hash\n"
    )
    (work / "config-bad.yaml").write_text("replay_window_s: 0\npolicies: []\n")
    (work / "tools.yaml").write_text("- name: get_weather\n- name: search\n")
    (work / "tools-bad-name.yaml").write_text("- name: search\n- name: get weather\n")
    openai = "openai: {kind: openai, base_url: 'http://127.0.0.1:9/v1', models: {%s: gpt-4o-mini}}"
    (work / "providers-typo.yaml").write_text(f"aliases: [fast]\nproviders:\n  {openai % 'fsat'}\n")
    (work / "providers-key.yaml").write_text(f"alias: [fast]\nproviders:\n  {openai % 'fast'}\n")
    (work / "providers-default.yaml").write_text(
        f"aliases: [fast]\ndefault_alias: gpt-4o-mini\nproviders:\n  {openai % 'fast'}\n"
    )
    claude = "claude: {kind: %s, base_url: 'https://api.anthropic.com', max_tokens: %d}"
    (work / "providers-kind.yaml").write_text(f"providers:\n  {claude % ('antropic', 1024)}\n")
    (work / "providers-max.yaml").write_text(f"providers:\n  {claude % ('anthropic', 0)}\n")
    plain = f"providers:\n  {openai % 'fast'}\naliases: [fast]\n"
    (work / "providers-prices.yaml").write_text(
        plain + "prices: {opneai: {gpt-4o-mini: {input: 0.15, output: 0.6}}}\n"
    )
    (work / "providers-negative.yaml").write_text(
        plain + "budgets: [{agent: '*', window: 1d, max_cost_usd: -5}]\n"
    )
    (work / "providers-window.yaml").write_text(
        plain + "budgets: [{agent: planner, window: 1w, max_tokens: 1000}]\n"
    )
    port = closed_port()
    env = base_env(work, f"127.0.0.1:{port}")

    def one(m: Mistake) -> subprocess.CompletedProcess[str]:
        return agentstream(m.args, {**env, **m.env}, work, m.stdin)

    with ThreadPoolExecutor(max_workers=4) as pool:
        results = dict(zip([m.id for m in MISTAKES], pool.map(one, MISTAKES), strict=True))
    yield {"port": port, "results": results}


def test_the_table_has_the_common_mistakes() -> None:
    assert len(MISTAKES) >= 15
    assert len({m.id for m in MISTAKES}) == len(MISTAKES)


@pytest.mark.xdist_group("cli-mistakes")  # `outcomes` once, not on every worker
@pytest.mark.parametrize("mistake", MISTAKES, ids=[m.id for m in MISTAKES])
def test_a_mistake_gets_a_clear_message_and_its_exit_code(
    mistake: Mistake, outcomes: dict[str, Any]
) -> None:
    res = outcomes["results"][mistake.id]
    out = res.stdout + res.stderr
    assert "Traceback" not in out, out
    assert "Unclosed" not in out, out
    for text in mistake.expect:
        assert text.format(port=outcomes["port"]) in out, out
    assert res.returncode == mistake.code, out


@pytest.mark.xdist_group("cli-mistakes")
def test_no_broker_is_one_line_with_what_to_do(outcomes: dict[str, Any]) -> None:
    res = outcomes["results"]["no-broker-topics-list"]
    assert res.stderr.splitlines() == [
        f"Error: BrokerError: no broker at 127.0.0.1:{outcomes['port']} (PLAINTEXT) — is it "
        "running, and is AGENTSTREAM_KAFKA_BOOTSTRAP (the CLI's -b) right?"
    ]


# -- --help: no settings needed, nothing touched --------------------------------------------
HELPS = [
    ("--help",),
    ("-h",),
    ("policy", "--help"),
    ("policy", "apply", "--help"),
    ("publish", "--help"),
    ("audit", "verify", "--help"),
    ("llm", "ask", "--help"),
    ("kafka", "start", "--help"),
    ("worker", "--help"),
    ("worker", "-h"),  # help, as everywhere (Faust's own -h is --web-host)
    ("-b", "127.0.0.1:9", "--topic-prefix", "stg.", "tail", "--help"),
]


def listing(tmp: Path) -> list[str]:
    """Everything under `tmp`, and what the repository's var/ holds (its top level: brokers
    of other test runs write below it meanwhile)."""
    var = REPO / "var"
    return sorted(
        [str(p) for p in tmp.rglob("*")] + [str(p) for p in (var.iterdir() if var.exists() else ())]
    )


@pytest.mark.xdist_group("repo-var")  # not beside the tests that add to var/
def test_help_needs_no_settings_and_touches_nothing(tmp_path: Path) -> None:
    # a "broker" that only listens: any connection attempt shows up in its backlog
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        listener.setblocking(False)
        host, port = listener.getsockname()
        env = {
            **base_env(tmp_path / "home", f"{host}:{port}"),
            "AGENTSTREAM_TOPIC_PARTITIONS": "zero",  # a bad setting: help needs none
            "AGENTSTREAM_LOG_FILE": str(tmp_path / "log" / "worker.log"),
            "PYTHONDONTWRITEBYTECODE": "1",
        }
        (tmp_path / "home").mkdir()
        cwd = tmp_path / "cwd"
        cwd.mkdir()
        before = listing(tmp_path)
        with ThreadPoolExecutor(max_workers=4) as pool:
            runs = list(pool.map(lambda args: agentstream(args, env, cwd), HELPS))
        for args, res in zip(HELPS, runs, strict=True):
            assert res.returncode == 0, (args, res.stderr)
            assert res.stdout.startswith("Usage: agentstream"), (args, res.stdout)
            assert res.stderr == "", (args, res.stderr)
        assert listing(tmp_path) == before
        with pytest.raises(BlockingIOError):
            listener.accept()  # nobody knocked


def test_worker_help_is_fausts_worker_help(tmp_path: Path) -> None:
    res = agentstream(("worker", "--help"), base_env(tmp_path, "127.0.0.1:1"), tmp_path)
    assert res.returncode == 0
    assert res.stdout.startswith("Usage: agentstream worker [OPTIONS]")
    assert "--web-port" in res.stdout and "--loglevel" in res.stdout


def test_version_is_the_installed_distributions(tmp_path: Path) -> None:
    from importlib.metadata import version

    res = agentstream(("--version",), base_env(tmp_path, "127.0.0.1:1"), tmp_path)
    assert (res.returncode, res.stdout) == (0, f"agentstream, version {version('agentstream')}\n")


# -- the pure parts ---------------------------------------------------------------------------
def test_global_options_are_split_from_the_command() -> None:
    from agentstream.streams.cli import split_global_options

    env, rest = split_global_options(
        ["-b", "k1:9092,k2:9092", "--topic-prefix=stg.", "tail", "-b", "x"]
    )
    assert env == {
        "AGENTSTREAM_KAFKA_BOOTSTRAP": "k1:9092,k2:9092",
        "AGENTSTREAM_TOPIC_PREFIX": "stg.",
    }
    assert rest == ["tail", "-b", "x"]  # a command's own options are not ours
    assert split_global_options(["--bootstrap-server", "h:1", "worker"]) == (
        {"AGENTSTREAM_KAFKA_BOOTSTRAP": "h:1"},
        ["worker"],
    )
    assert split_global_options(["--help"]) == ({}, ["--help"])
    with pytest.raises(click.UsageError, match="'--topic-prefix' requires an argument"):
        split_global_options(["--topic-prefix", "--help"])
    with pytest.raises(click.UsageError, match="'-b': an empty value"):
        split_global_options(["-b", "", "tail"])
    # an empty prefix is the default one, not a mistake
    assert split_global_options(["--topic-prefix=", "tail"]) == (
        {"AGENTSTREAM_TOPIC_PREFIX": ""},
        ["tail"],
    )


def test_worker_dash_h_is_help() -> None:
    from agentstream.streams.cli.core import worker_args

    assert worker_args(["-l", "info", "-h"]) == ["-l", "info", "--help"]
    assert worker_args(["--web-host", "0.0.0.0"]) == ["--web-host", "0.0.0.0"]


def test_start_offsets_as_kcat_takes_them() -> None:
    from agentstream.streams.client import check_start_offset

    assert check_start_offset(None) == "end"
    assert check_start_offset("Beginning") == "beginning"
    assert check_start_offset("-10") == -10
    assert check_start_offset("42") == 42
    assert check_start_offset(7) == 7
    assert check_start_offset("s@1733380000000") == datetime(2024, 12, 5, 6, 26, 40, tzinfo=UTC)
    assert check_start_offset("2026-01-01T00:00:00Z") == datetime(2026, 1, 1, tzinfo=UTC)
    ago = check_start_offset("-15m")
    assert isinstance(ago, datetime) and ago < datetime.now(UTC)
    for bad in ("soon", "", "s@x", True, 1.5):
        with pytest.raises(ValueError, match="'beginning', 'end'"):
            check_start_offset(bad)  # type: ignore[arg-type]


def test_an_unreachable_broker_error_says_what_to_do() -> None:
    from aiokafka.errors import KafkaConnectionError

    from agentstream.streams.cli import error_text
    from agentstream.streams.kafka_security import connect_error
    from agentstream.streams.settings import Settings

    port = closed_port()
    local = Settings.from_env({"AGENTSTREAM_KAFKA_PORT": str(port)})
    exc = asyncio.run(connect_error(local, KafkaConnectionError("Unable to bootstrap"), "x"))
    assert error_text(exc) == (
        f"BrokerError: no broker at 127.0.0.1:{port} (PLAINTEXT) — start one with "
        "'agentstream kafka start', or name one in AGENTSTREAM_KAFKA_BOOTSTRAP (the CLI's -b)"
    )
    there = Settings.from_env({"AGENTSTREAM_KAFKA_BOOTSTRAP": f"127.0.0.1:{port}"})
    exc = asyncio.run(connect_error(there, KafkaConnectionError("Unable to bootstrap"), "x"))
    assert error_text(exc).endswith("is AGENTSTREAM_KAFKA_BOOTSTRAP (the CLI's -b) right?")


def test_other_pipeline_errors_keep_their_class_and_message() -> None:
    from agentstream.streams.cli import error_text
    from agentstream.streams.errors import BrokerAuthError, BrokerError

    assert error_text(BrokerAuthError("refused")) == "BrokerAuthError: refused"
    assert error_text(BrokerError("topic x does not exist")) == (
        "BrokerError: topic x does not exist"
    )


def test_settings_errors_exit_2_one_error_line_each() -> None:
    from click.testing import CliRunner

    from agentstream.streams.cli import pipeline_error
    from agentstream.streams.settings import Settings, SettingsError

    with pytest.raises(SettingsError) as info:
        Settings.from_env({"AGENTSTREAM_WEB_PORT": "x", "AGENTSTREAM_BATCH_MAX": "0"})
    error = pipeline_error(info.value)
    assert error is not None and error.exit_code == 2

    @click.command()
    def fails() -> None:
        raise error

    res = CliRunner().invoke(fails)
    assert res.exit_code == 2
    assert [line.split("=")[0] for line in res.output.splitlines()] == [
        "Error: AGENTSTREAM_WEB_PORT",
        "Error: AGENTSTREAM_BATCH_MAX",
    ]


def test_missing_files_are_named_with_their_variable(tmp_path: Path) -> None:
    from agentstream.streams.cli import missing_files
    from agentstream.streams.settings import Settings

    (tmp_path / "ca.pem").write_text("")
    settings = Settings.from_env(
        {
            "AGENTSTREAM_KAFKA_SSL_CAFILE": str(tmp_path / "ca.pem"),
            "AGENTSTREAM_LLM_PROVIDERS_FILE": str(tmp_path),
            "AGENTSTREAM_LOG_FILE": str(tmp_path / "not-yet.log"),  # created when needed
        }
    )
    assert missing_files(settings) == [
        f"AGENTSTREAM_LLM_PROVIDERS_FILE={str(tmp_path)!r}: is a directory"
    ]


def test_faust_log_levels() -> None:
    from agentstream.streams.cli import ConfigError
    from agentstream.streams.cli.core import faust_loglevel

    assert faust_loglevel("WARNING") == "warn"  # the default, which Faust refuses as is
    assert faust_loglevel("critical") == "crit"
    assert faust_loglevel(" info ") == "info"
    with pytest.raises(ConfigError, match="AGENTSTREAM_LOG_LEVEL='loud'"):
        faust_loglevel("loud")


def test_worker_options_are_checked_without_an_app() -> None:
    from agentstream.streams.cli.core import check_worker_args

    check_worker_args(["-l", "info", "--web-port", "6067", "--without-web"])
    with pytest.raises(click.BadParameter, match="'http' is not a valid range"):
        check_worker_args(["--web-port", "http"])
    with pytest.raises(click.NoSuchOption):
        check_worker_args(["--bogus"])


def test_check_topic() -> None:
    from agentstream.streams.cli.core import check_topic

    assert check_topic("agent.messages") == "agent.messages"
    assert check_topic("stg.agent.messages", "stg.") == "agent.messages"
    with pytest.raises(click.UsageError, match=r"did you mean 'agent.messages'\?"):
        check_topic("agent.mesages")
    with pytest.raises(click.UsageError, match=r"unknown topic 'stg\.agent\.messages'"):
        check_topic("stg.agent.messages")


def test_the_command_tree_needs_no_app() -> None:
    """Agent commands live in modules named `cli`: the tree built from those alone is the
    one a full autodiscovery gives."""
    from agentstream.streams.cli import cli, command_modules, load_commands

    assert command_modules("agentstream.agents") == [
        "agentstream.agents.audit.cli",
        "agentstream.agents.comms.cli",
        "agentstream.agents.heartbeat.cli",
        "agentstream.agents.llm.cli",
        "agentstream.agents.security.cli",
    ]
    assert command_modules("agentstream.agents.security") == ["agentstream.agents.security.cli"]
    load_commands({})

    def tree(group: click.Group) -> set[str]:
        names = set()
        for name, cmd in group.commands.items():
            names.add(name)
            if isinstance(cmd, click.Group):
                names |= {f"{name} {sub}" for sub in tree(cmd)}
        return names

    before = tree(cli)
    from agentstream.streams.app import app

    app.discover()
    assert tree(cli) == before
    assert {"policy apply", "audit verify", "llm ask", "agents status", "comms"} <= before


def test_policy_file_errors_name_the_file_and_line() -> None:
    from agentstream.agents.security.cli import PolicyFileError, parse_policy_file

    with pytest.raises(PolicyFileError, match=r"^p\.yaml, line 3, column 6: not YAML or JSON"):
        parse_policy_file("policy_id: a\nlevel: x\n  bad: y\n", "p.yaml")
    with pytest.raises(PolicyFileError, match=r"^p\.json, line 2: not a policy file: nested"):
        parse_policy_file('{"policies":\n' + "[" * 65 + "]" * 65 + "}", "p.json")
    items, _ = parse_policy_file('{"policies": ' + "[" * 1 + '{"policy_id": "a"}]}', "p.json")
    assert items == [{"policy_id": "a"}]


def test_fold_topic_names_a_broker_failure_and_stops_its_consumer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from aiokafka.errors import KafkaConnectionError

    from agentstream.agents.security import store
    from agentstream.streams.errors import BrokerError
    from agentstream.streams.settings import Settings

    class Consumer:
        stopped = False

        async def start(self) -> None:
            pass

        def partitions_for_topic(self, name: str) -> set[int]:
            return {0}

        def assign(self, tps: Any) -> None:
            pass

        async def seek_to_beginning(self, *tps: Any) -> None:
            pass

        async def end_offsets(self, tps: Any) -> dict[Any, int]:
            raise KafkaConnectionError("connection lost")

        async def stop(self) -> None:
            Consumer.stopped = True

    monkeypatch.setattr(store, "group_less_consumer", lambda *a, **k: Consumer())
    with pytest.raises(BrokerError, match=r"reading security\.policies failed: KafkaConnection"):
        asyncio.run(store.fold_topic(Settings.from_env({}), "security.policies", {}))
    assert Consumer.stopped


def test_importing_the_app_with_bad_settings_is_the_same_error_lines(tmp_path: Path) -> None:
    """`faust -A agentstream.streams.app worker` imports the app itself: no traceback there
    either."""
    env = {**base_env(tmp_path, "127.0.0.1:1"), "AGENTSTREAM_WEB_PORT": "http"}
    res = subprocess.run(
        [sys.executable, "-c", "import agentstream.streams.app"],
        env={**env, "AGENTSTREAM_TOPIC_PARTITIONS": "0"},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 2, res.stderr
    assert res.stderr.splitlines() == [
        "Error: AGENTSTREAM_TOPIC_PARTITIONS='0': Input should be greater than or equal to 1",
        "Error: AGENTSTREAM_WEB_PORT='http': Input should be a valid integer, unable to parse "
        "string as an integer",
    ]


def test_json_has_one_meaning_in_every_command() -> None:
    """`--json` is the command's result as JSON on stdout: one document, or one object per
    line for a listing, said the same way everywhere (`json_option`)."""
    from agentstream.streams.cli import cli, load_commands

    load_commands({})
    texts = {
        "Print the result as one JSON document instead of text.",
        "Print one JSON object per line instead of text.",
    }
    found: dict[str, str] = {}

    def walk(group: click.Group, path: str) -> None:
        for name, cmd in group.commands.items():
            if isinstance(cmd, click.Group):
                walk(cmd, f"{path}{name} ")
            for param in cmd.params:
                if "--json" in getattr(param, "opts", []):
                    found[f"{path}{name}"] = str(getattr(param, "help", ""))

    walk(cli, "")
    assert len(found) >= 12, found
    assert {cmd: text for cmd, text in found.items() if text not in texts} == {}


def test_a_replay_that_fails_leaves_an_existing_output_file_as_it_was(tmp_path: Path) -> None:
    # the file used to be opened for writing before the broker was reached: an earlier
    # replay's output was cut to nothing by one that could not start
    out = tmp_path / "old.jsonl"
    out.write_bytes(b'{"earlier": "replay"}\n')
    env = base_env(tmp_path, f"127.0.0.1:{closed_port()}")
    res = agentstream(
        ("replay", "--topics", "agent.messages", "--since", "-1h", "--out", str(out)),
        env,
        tmp_path,
        "",
    )
    assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr
    assert out.read_bytes() == b'{"earlier": "replay"}\n'
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.endswith(".part")) == []


def test_a_secret_on_stdin_that_is_not_text_is_named_so(tmp_path: Path) -> None:
    # it reached the keychain as surrogates, and the keychain was blamed
    env = base_env(tmp_path, f"127.0.0.1:{closed_port()}")
    res = subprocess.run(
        [sys.executable, "-m", "agentstream", "credentials", "set", "--secret", "k", "--stdin"],
        env=env,
        cwd=tmp_path,
        input=b"\xff\xfe\x00binary",
        capture_output=True,
        timeout=120,
    )
    err = res.stderr.decode(errors="replace")
    assert res.returncode == 1 and "Traceback" not in err, err
    assert err.strip() == "Error: the value on stdin is not UTF-8 text"
