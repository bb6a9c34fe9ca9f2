#!/usr/bin/env bash
# System packages the project needs beyond Python: Java 17 + Maven (to assemble and run
# Apache Kafka from Maven Central), Debian's chromium (browser tests of the HTML audit
# report) and Debian's prometheus, for its promtool (tests/unit/test_alert_rules.py checks
# and unit-tests infra/prometheus/alerts.yml with it), and tmux, the terminal
# tests/integration/test_console.py runs `agentstream top` in. Installs only what is missing, and
# only where apt-get can (root on Debian).
set -euo pipefail
need=()
command -v java >/dev/null 2>&1 || need+=(openjdk-17-jre-headless)
command -v mvn >/dev/null 2>&1 || need+=(maven)
command -v chromium >/dev/null 2>&1 || need+=(chromium)
command -v promtool >/dev/null 2>&1 || need+=(prometheus)
command -v tmux >/dev/null 2>&1 || need+=(tmux)
if [ ${#need[@]} -eq 0 ]; then
  exit 0
fi
if [ "$(id -u)" != "0" ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "missing system packages: ${need[*]} (install them with your package manager)" >&2
  exit 1
fi
echo "installing system packages: ${need[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >/dev/null
apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
# Only promtool is wanted from the prometheus package. Under systemd the package also
# enables and starts its server, which would hold port 9090, the port the compose profile
# "monitoring" publishes its own Prometheus on: stop it and keep it from starting at boot.
if [[ " ${need[*]} " == *" prometheus "* ]] && [ -d /run/systemd/system ]; then
  systemctl disable --now prometheus.service >/dev/null 2>&1 || true
fi
