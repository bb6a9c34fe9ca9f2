# syntax=docker/dockerfile:1
# The agentstream worker: `docker build -t agentstream:local .` (docs/deploy.md).
#
# Two stages. `build` turns the source into wheels: the project's own and one for every
# dependency (each has a manylinux wheel, so no compiler is needed). `runtime` installs
# those wheels offline into a virtualenv and holds no source tree, no build tool output
# and no secret: secrets are files mounted at run time (/run/secrets, the `dir` source of
# the credentials chain) or AGENTSTREAM_SECRET_<ENTRY> variables (`env`). The keychain is
# not a source here, so no keyring backend is ever looked for.
#
# tests/unit/test_container_files.py parses this file: pinned slim base of the project's
# Python, non-root user before the entrypoint, healthcheck on /health, wheel-only install,
# every AGENTSTREAM_* variable a real setting, nothing secret in ENV or ARG.

# One base for both stages: the wheels built in `build` must fit the `runtime` Python.
# Pinned by tag; bump it on purpose (and with it the Python of the wheels).
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
# What the wheel is made of, and nothing else: pyproject.toml names README.md as the
# readme, and [tool.setuptools.packages.find] the package `agentstream`, whose
# subpackages are symlinks (kept as such by COPY) to the folders copied next to it.
# the tested versions (constraints.txt) and the licence the wheel carries
COPY pyproject.toml README.md LICENSE constraints.txt ./
COPY agentstream/ agentstream/
COPY schemas/ schemas/
COPY streams/ streams/
COPY agents/ agents/
COPY infra/ infra/
RUN python -m pip wheel --constraint constraints.txt --wheel-dir /wheels .

FROM ${PYTHON_IMAGE} AS runtime
# PYTHONSAFEPATH: `python -m` (the healthcheck) never imports from the writable workdir.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PYTHONSAFEPATH=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/agentstream/bin:$PATH
# A fixed uid/gid (10001), so volume ownership and Kubernetes' runAsUser agree with the
# image; its home is the data dir, which is all it may write.
RUN groupadd --system --gid 10001 agentstream \
    && useradd --system --uid 10001 --gid 10001 --no-create-home \
        --home-dir /var/lib/agentstream --shell /usr/sbin/nologin agentstream \
    && install -d -o 10001 -g 10001 -m 0750 /var/lib/agentstream
# The wheels are bind-mounted from `build` for this step only: they never become a layer.
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    python -m venv /opt/agentstream \
    && /opt/agentstream/bin/pip install --no-index --find-links /wheels agentstream
ENV AGENTSTREAM_DATA_DIR=/var/lib/agentstream \
    AGENTSTREAM_WEB_HOST=0.0.0.0 \
    AGENTSTREAM_WEB_PORT=6066 \
    AGENTSTREAM_SECRET_SOURCES=env,dir \
    AGENTSTREAM_SECRETS_DIR=/run/secrets
WORKDIR /var/lib/agentstream
USER 10001:10001
EXPOSE 6066
# GET /health (no token needed) on this container's web port, without proxies, with a
# timeout shorter than Docker's (infra/compose/healthcheck.py says why not curl or -c).
HEALTHCHECK --interval=15s --timeout=10s --start-period=60s --retries=3 \
    CMD ["python", "-m", "agentstream.infra.compose.healthcheck"]
ENTRYPOINT ["agentstream"]
CMD ["worker"]
