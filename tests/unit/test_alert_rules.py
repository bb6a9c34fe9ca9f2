"""infra/prometheus/alerts.yml: valid rules (`promtool check rules`) that behave as
alerts.test.yml says (`promtool test rules`), loaded by both Prometheus configs of
docker-compose.kafka.yml from where compose mounts them (`promtool check config`),
written only against metrics and labels the workers export, and each on the Grafana
dashboard. promtool comes with Debian's prometheus package (`make system-deps`); without
it these tests fail, they never skip."""

from __future__ import annotations

import importlib
import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import REGISTRY
from prometheus_client.metrics import MetricWrapperBase

from agentstream.agents.health.status import RANK, Component, overall
from agentstream.streams.observability import DECISION_SECONDS

REPO = Path(__file__).resolve().parents[2]
PROM_DIR = REPO / "infra" / "prometheus"
RULES = PROM_DIR / "alerts.yml"
RULE_TESTS = PROM_DIR / "alerts.test.yml"
DASHBOARD = REPO / "infra" / "grafana" / "dashboards" / "agentstream.json"
COMPOSE = REPO / "docker-compose.kafka.yml"
#: the Prometheus services of docker-compose.kafka.yml (profiles monitoring and cluster)
PROMETHEUS_SERVICES = ("prometheus", "cluster-prometheus")
#: series Prometheus writes itself for every target, with the target's labels only
PROMETHEUS_OWN = {"up"}
#: labels Prometheus adds to every scraped series (the configs' static labels come on top)
TARGET_LABELS = {"instance", "job"}
SEVERITIES = {"warning", "critical"}

# PromQL words that are not metric names
KEYWORDS = {
    "and",
    "or",
    "unless",
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "offset",
    "bool",
    "inf",
    "nan",
}
GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
SELECTOR = re.compile(r"(?<![\w.])([A-Za-z_:][A-Za-z0-9_:]*)\s*\{([^}]*)\}")
MATCHER_LABEL = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)\s*(?:=~|!~|!=|=)")
STRING = re.compile(r'"(?:[^"\\]|\\.)*"')


def promtool() -> str:
    # called in the tests, not a fixture: a missing promtool is then a failed test, as
    # the broker tests fail when no broker starts, not an error in setup or a skip
    found = shutil.which("promtool")
    if found is None:
        pytest.fail(
            "promtool is not installed: run `make system-deps` (as root on Debian it "
            "installs the prometheus package, which ships promtool)"
        )
    return found


def run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=120, cwd=cwd)


def rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load(RULES.read_text(encoding="utf-8"))["groups"]
    return [rule for group in groups for rule in group["rules"]]


def alerts() -> dict[str, dict[str, Any]]:
    return {rule["alert"]: rule for rule in rules() if "alert" in rule}


def metric_names(expr: str) -> set[str]:
    """Names of the series an expression selects: every identifier that is neither a
    keyword nor a function (followed by `(`), once strings, label matchers, range and
    grouping clauses are taken out."""
    text = STRING.sub('""', expr)
    text = re.sub(r"\{[^}]*\}", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = GROUPING.sub(" ", text)
    text = re.sub(r"\b(?:group_left|group_right)\b", " ", text)
    names = set()
    for m in re.finditer(r"(?<![\w.])[A-Za-z_:][A-Za-z0-9_:]*", text):
        word = m.group()
        if word.lower() in KEYWORDS or text[m.end() :].lstrip().startswith("("):
            continue
        names.add(word)
    return names


def grouping_labels(expr: str) -> set[str]:
    return {
        label.strip()
        for clause in GROUPING.findall(STRING.sub('""', expr))
        for label in clause.split(",")
        if label.strip()
    }


def selector_labels(expr: str) -> Iterator[tuple[str, str]]:
    """(metric, label) for every label matcher of a selector."""
    for name, matchers in SELECTOR.findall(STRING.sub('""', expr)):
        for label in MATCHER_LABEL.findall(matchers):
            yield name, label


def exporting_modules() -> list[str]:
    """The modules of the distribution that use prometheus-client, found in the source
    (agentstream/ holds symlinks to streams/ and agents/, where they live)."""
    found = []
    for top in ("streams", "agents"):
        for path in sorted((REPO / top).rglob("*.py")):
            if "prometheus_client" in path.read_text(encoding="utf-8"):
                parts = path.relative_to(REPO).with_suffix("").parts
                found.append(".".join(("agentstream", *parts)))
    return found


def exported() -> dict[str, set[str] | None]:
    """Sample name → label names of every metric in the default registry once every
    module that uses prometheus-client is imported: what /metrics (generate_latest() of
    that registry) can show. Collectors other than the client's metric classes say no
    label names up front: None."""
    modules = exporting_modules()
    assert "agentstream.streams.observability" in modules
    for module in modules:
        importlib.import_module(module)
    out: dict[str, set[str] | None] = {}
    for collector, names in REGISTRY._collector_to_names.items():
        for name in names:
            if isinstance(collector, MetricWrapperBase):
                labels = set(collector._labelnames)
                out[name] = labels | ({"le"} if name.endswith("_bucket") else set())
            else:
                out[name] = None
    return out


def static_labels() -> set[str]:
    """The labels the Prometheus configs add to every worker's series."""
    labels = set(TARGET_LABELS)
    for config in ("prometheus.yml", "prometheus.cluster.yml"):
        prom = yaml.safe_load((PROM_DIR / config).read_text(encoding="utf-8"))
        for job in prom["scrape_configs"]:
            for static in job["static_configs"]:
                labels |= set(static.get("labels", {}))
    return labels


# == the rules themselves ===============================================================
def test_promtool_checks_the_rules() -> None:
    done = run(promtool(), "check", "rules", str(RULES))
    assert done.returncode == 0, done.stdout + done.stderr
    # every rule of the file was read, none dropped
    assert f"SUCCESS: {len(rules())} rules found" in done.stdout, done.stdout


def test_promtool_rule_tests_pass() -> None:
    done = run(promtool(), "test", "rules", str(RULE_TESTS))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout, done.stdout


def test_every_alert_has_a_case_that_fires_and_one_that_does_not() -> None:
    spec = yaml.safe_load(RULE_TESTS.read_text(encoding="utf-8"))
    assert [PROM_DIR / f for f in spec["rule_files"]] == [RULES]
    fires: set[str] = set()
    quiet: set[str] = set()
    for case in spec["tests"]:
        for check in case.get("alert_rule_test", []):
            (fires if check.get("exp_alerts") else quiet).add(check["alertname"])
    # promtool compares the whole list of firing alerts, so every series of a firing case
    # that is not listed is checked not to fire as well
    assert fires == set(alerts()), "alerts without a case that fires them"
    assert quiet == set(alerts()), "alerts without a case where they must stay quiet"


def test_every_alert_says_how_bad_for_how_long_and_where() -> None:
    assert alerts(), "no alerts"
    assert len(rules()) == len(alerts()), "recording rules belong in a file of their own"
    for name, rule in alerts().items():
        assert name.startswith("Agentstream"), name
        assert rule.get("for"), f"{name}: no `for:`, a single bad scrape would page"
        assert rule["labels"]["severity"] in SEVERITIES, name
        annotations = rule["annotations"]
        assert annotations["summary"] and annotations["description"], name
        # the summary names where the problem is: a label of the series, not only a count
        assert "$labels." in annotations["summary"], f"{name}: summary locates nothing"


# == what the rules are written against =================================================
def test_alert_expressions_use_exported_metrics_and_labels() -> None:
    metrics = exported()
    known_labels = static_labels()
    for name, rule in alerts().items():
        expr = rule["expr"]
        used = metric_names(expr)
        assert used, f"{name}: no metric in {expr}"
        labels_of: dict[str, set[str]] = {}
        for metric in used:
            if metric in PROMETHEUS_OWN:
                labels_of[metric] = set(known_labels)
                continue
            assert metric in metrics, f"{name}: {metric} is not exported by the workers"
            own = metrics[metric]
            assert own is not None, f"{name}: {metric} has no declared labels to check"
            labels_of[metric] = own | known_labels
        available = set().union(*labels_of.values())
        for metric, label in selector_labels(expr):
            assert label in labels_of[metric], f"{name}: {metric} has no label {label}"
        for label in grouping_labels(expr):
            assert label in available, f"{name}: no metric in {expr} has label {label}"
        for text in rule["annotations"].values():
            for label in re.findall(r"\$labels\.([A-Za-z_][A-Za-z0-9_]*)", text):
                assert label in available, f"{name}: annotation uses unknown label {label}"


def test_metric_name_parsing_finds_selected_series_only() -> None:
    # the parser above decides what the previous test checks: it must see through
    # functions, grouping and matching clauses, matchers, ranges and numbers
    expr = (
        'rate(a_total{x="y", z=~"sum(b)"}[10m]) / on (i, j) group_left '
        "sum by (i, j) (rate(c_total[5m] offset 1h)) > 1e3 and d >= 2 unless up"
    )
    assert metric_names(expr) == {"a_total", "c_total", "d", "up"}
    assert grouping_labels(expr) == {"i", "j"}
    assert set(selector_labels(expr)) == {("a_total", "x"), ("a_total", "z")}


def test_job_matchers_name_the_configs_job() -> None:
    # a renamed scrape job would leave `up{job="..."}` selecting nothing, silently
    jobs = {
        job["job_name"]
        for config in ("prometheus.yml", "prometheus.cluster.yml")
        for job in yaml.safe_load((PROM_DIR / config).read_text(encoding="utf-8"))["scrape_configs"]
    }
    matched = {
        value
        for rule in alerts().values()
        for value in re.findall(r'\bjob\s*=\s*"([^"]*)"', rule["expr"])
    }
    assert matched, "no alert selects the workers' job"
    assert matched <= jobs, f"{matched - jobs} is no scrape job of the Prometheus configs"


def test_ready_alert_fires_on_what_makes_ready_answer_503() -> None:
    # AgentstreamWorkerNotReady compares agentstream_ready_component with the value the
    # worker exports for "down", the status that makes /ready answer 503
    expr = alerts()["AgentstreamWorkerNotReady"]["expr"]
    m = re.fullmatch(r"agentstream_ready_component == (\d+)", expr.strip())
    assert m, expr
    assert int(m.group(1)) == RANK["down"]
    # and only "down" makes a worker unready: a degraded component must not fire it
    for status in RANK:
        unready = overall([Component("x", status)]) == "down"
        assert unready == (RANK[status] == int(m.group(1))), status


def test_decision_latency_threshold_is_a_bucket_bound() -> None:
    # histogram_quantile interpolates inside a bucket: only at a bucket's bound does
    # "p99 above the threshold" mean exactly "more than 1 % of decisions took longer"
    expr = " ".join(alerts()["AgentstreamDecisionLatencyHigh"]["expr"].split())
    m = re.fullmatch(
        r"histogram_quantile\(0\.99, sum without \(verdict\) "
        r"\(rate\(agentstream_security_decision_seconds_bucket\[\w+\]\)\) \) > ([\d.]+)",
        expr,
    )
    assert m, expr
    assert float(m.group(1)) in DECISION_SECONDS._upper_bounds


# == where the rules are loaded and shown ===============================================
@pytest.mark.parametrize("service", PROMETHEUS_SERVICES)
def test_compose_prometheus_loads_the_rules(service: str, tmp_path: Path) -> None:
    """Rebuild the container's /etc/prometheus from the service's mounts of files in the
    repository, point the token at a stand-in, and let promtool load the config: it fails
    if a rule file the config names is not where compose puts it."""
    compose = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    etc = tmp_path / "etc-prometheus"
    etc.mkdir()
    for volume in compose["services"][service]["volumes"]:
        source, target = volume.split(":")[:2]
        if source.startswith("./infra/") and target.startswith("/etc/prometheus/"):
            shutil.copyfile(REPO / source, etc / target.removeprefix("/etc/prometheus/"))
    config_file = etc / "prometheus.yml"
    config = yaml.safe_load(config_file.read_text(encoding="utf-8"))
    assert config.get("rule_files"), f"{service}: its config loads no rules"
    token = tmp_path / "token"
    token.write_text("stand-in\n")
    for job in config["scrape_configs"]:
        job["authorization"]["credentials_file"] = str(token)
    config_file.write_text(yaml.safe_dump(config), encoding="utf-8")
    done = run(promtool(), "check", "config", str(config_file))
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(rules())} rules found" in done.stdout, done.stdout


def test_every_alert_metric_is_on_the_dashboard() -> None:
    dash = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    shown = {
        name
        for panel in dash["panels"]
        for target in panel["targets"]
        for name in metric_names(target["expr"])
    }
    for name, rule in alerts().items():
        # Prometheus's own `up` too: the dashboard has a panel of the workers that are up
        for metric in metric_names(rule["expr"]):
            assert metric in shown, f"{name}: no dashboard panel shows {metric}"
