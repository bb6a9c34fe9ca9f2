# The two commands of README: `make demo` (the main job) and `make test` (the whole suite).
# Both bootstrap everything they need on a fresh machine: a virtualenv with the project,
# the Kafka jars from Maven Central (cached under ~/.cache/agentstream) and, for the
# browser tests, Debian's chromium.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp

.PHONY: demo test lint typecheck unit integration bench chaos clean install system-deps

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

system-deps:
	@bash infra/system-deps.sh

demo: install system-deps
	$(VENV)/bin/agentstream demo $(DEMO_ARGS)

lint: install
	$(VENV)/bin/ruff check schemas streams agents infra bench tests
	$(VENV)/bin/ruff format --check schemas streams agents infra bench tests

typecheck: install
	$(VENV)/bin/mypy

unit: install
	$(PY) -m pytest tests/unit -q

integration: install system-deps
	$(PY) -m pytest tests/integration -q

test: install system-deps
	$(VENV)/bin/ruff check schemas streams agents infra bench tests
	$(VENV)/bin/ruff format --check schemas streams agents infra bench tests
	$(VENV)/bin/mypy
	$(PY) -m pytest -q -p no:cacheprovider --durations=15

bench: install system-deps
	$(PY) -m bench $(BENCH_ARGS)

# The fault-injection suite (tests/chaos): every scenario K times, a JSON + Markdown report
# under var/chaos/. CHAOS_ARGS="--scenario worker_kill --runs 1 --messages 5000" runs less.
chaos: install system-deps
	$(PY) -m infra.toxiproxy install
	$(PY) -m tests.chaos $(CHAOS_ARGS)

clean:
	-$(VENV)/bin/agentstream kafka stop
	rm -rf var
