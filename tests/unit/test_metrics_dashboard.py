"""The Grafana dashboard and the Prometheus config match the code: every metric a panel
queries is one the pipeline exports, with the labels the panel groups by, or Prometheus's
`up` of the workers' scrape job; and the provisioning files are where
docker-compose.kafka.yml mounts them."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml
from prometheus_client.metrics import MetricWrapperBase

import agentstream.agents.llm.adapter as llm_adapter
import agentstream.streams.observability as observability

REPO = Path(__file__).resolve().parents[2]
DASHBOARD = REPO / "infra" / "grafana" / "dashboards" / "agentstream.json"
#: the one series a panel may query that no worker exports: whether Prometheus reaches
#: each worker, written by Prometheus for the scrape job of prometheus.yml
WORKERS_UP = 'up{job="agentstream"}'
SUFFIXES = {
    "counter": ("_total", "_created"),
    "gauge": ("",),
    "histogram": ("_bucket", "_count", "_sum", "_created"),
    "summary": ("_count", "_sum", "_created", ""),
}


def exported() -> dict[str, set[str]]:
    """Sample name → label names, for every metric in streams.observability."""
    out: dict[str, set[str]] = {}
    for obj in vars(observability).values():
        if isinstance(obj, MetricWrapperBase):
            labels = set(obj._labelnames)
            for suffix in SUFFIXES[obj._type]:
                out[obj._name + suffix] = labels | ({"le"} if suffix == "_bucket" else set())
    return out


def test_every_panel_queries_exported_metrics_and_labels() -> None:
    dash = json.loads(DASHBOARD.read_text())
    metrics = exported()
    assert dash["uid"] and dash["panels"]
    seen: set[str] = set()
    for panel in dash["panels"]:
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            expr = target["expr"]
            if WORKERS_UP in expr:
                seen.add(WORKERS_UP)
            # any other `up` (another job's, or every job's) is not the workers'; label
            # values such as state="up" are no series
            rest = expr.replace(WORKERS_UP, "")
            unquoted = re.sub(r'"(?:[^"\\]|\\.)*"', '""', rest)
            assert not re.search(r"(?<![\w.])up\b", unquoted), f"{panel['title']}: {expr}"
            names = set(re.findall(r"\bagentstream_[a-z0-9_]+", expr))
            assert names or rest != expr, f"{panel['title']}: no agentstream metric in {expr}"
            for name in names:
                assert name in metrics, f"{panel['title']}: {name} is not exported"
            grouped = {
                label.strip()
                for clause in re.findall(r"by \(([^)]*)\)", expr)
                for label in clause.split(",")
            }
            for label in grouped:
                assert any(label in metrics[n] for n in names), (
                    f"{panel['title']}: no metric in {expr} has label {label}"
                )
            seen |= names
    # what the issue asks the dashboard to show
    for must in (
        "agentstream_events_out_total",
        "agentstream_dead_letters_total",
        "agentstream_security_decisions_total",
        "agentstream_llm_latency_seconds_bucket",
        "agentstream_llm_tokens_total",
        "agentstream_breaker_state",
        "agentstream_agents",
        "agentstream_consumer_lag",
        WORKERS_UP,
    ):
        assert must in seen, must


def test_provisioning_matches_compose_mounts() -> None:
    compose = yaml.safe_load((REPO / "docker-compose.kafka.yml").read_text())
    services = compose["services"]
    mounts = {
        v.split(":")[1]: REPO / v.split(":")[0]
        for name in ("prometheus", "grafana")
        for v in services[name]["volumes"]
        if v.startswith("./")
    }
    prom = yaml.safe_load(mounts["/etc/prometheus/prometheus.yml"].read_text())
    job = prom["scrape_configs"][0]
    assert job["metrics_path"] == "/metrics"
    assert f'up{{job="{job["job_name"]}"}}' == WORKERS_UP  # what the panel selects
    assert job["static_configs"][0]["targets"]
    prov = mounts["/etc/grafana/provisioning"]
    ds = yaml.safe_load((prov / "datasources" / "prometheus.yml").read_text())["datasources"][0]
    assert ds["type"] == "prometheus" and ds["url"].startswith("http://prometheus:")
    provider = yaml.safe_load((prov / "dashboards" / "agentstream.yml").read_text())["providers"][0]
    assert provider["options"]["path"] == "/etc/grafana/dashboards"
    assert (mounts["/etc/grafana/dashboards"] / DASHBOARD.name).is_file()
    dash = json.loads(DASHBOARD.read_text())
    for panel in dash["panels"]:
        assert panel["datasource"]["uid"] == ds["uid"], panel["title"]


def test_monitoring_docs_name_every_metric_with_its_labels() -> None:
    # the `GET /metrics` item of docs/monitoring.md lists what it exports with its labels,
    # the common prefix left off after the first names ("`_events_out_total{topic}`")
    doc = (REPO / "docs" / "monitoring.md").read_text(encoding="utf-8")
    start = doc.index("- `GET /metrics`")
    listed = doc[start : doc.index("\n\n", start)]
    found = 0
    for module in (observability, llm_adapter):  # every module that defines a metric
        for obj in vars(module).values():
            if isinstance(obj, MetricWrapperBase):
                found += 1
                name = obj._name + ("_total" if obj._type == "counter" else "")
                labels = "{" + ",".join(obj._labelnames) + "}" if obj._labelnames else ""
                short = name.removeprefix("agentstream")
                assert f"`{name}{labels}`" in listed or f"`{short}{labels}`" in listed, (
                    f"{name}{labels} is not listed"
                )
    assert found >= 17
