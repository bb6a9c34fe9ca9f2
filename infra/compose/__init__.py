"""The container deployment: the worker image (Dockerfile) and the compose profile
``cluster`` of docker-compose.kafka.yml (three SASL_SSL brokers, three workers,
Prometheus and Grafana). See docs/deploy.md.

* :mod:`infra.compose.material` — ``python -m agentstream.infra.compose init|check``: the CA, the
  brokers' key stores, SCRAM passwords, chain keys and tokens the profile mounts.
* :mod:`infra.compose.healthcheck` — the image's ``HEALTHCHECK`` (``GET /health``).
* ``kafka-broker.sh`` — how each broker of the profile starts (SCRAM users at format time).
"""
