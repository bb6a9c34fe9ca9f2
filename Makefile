# The two commands of README: `make demo` (the main job) and `make test` (the whole suite).
# Both bootstrap everything they need on a fresh machine: a virtualenv with the project,
# the Kafka jars from Maven Central (cached under ~/.cache/agentstream) and, for the
# browser tests, Debian's chromium.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
# pytest-xdist workers of `make test` and `make integration`. The integration tests mostly
# wait (Kafka sessions, polling, worker start-ups): on the 2-core machines two workers run
# the pytest part in 11.5-13.5 minutes, serially it took 17.5. Three were faster (11.5) but
# saturate the CPU: in one of three fresh-clone runs a fault-injection test's checks ran
# past its time bound. Groups keep apart what must not run side by side
# (docs/development.md, "Running tests in parallel"). TEST_WORKERS=0 runs serially.
TEST_WORKERS ?= 2

.PHONY: demo test lint typecheck unit integration bench chaos clean install lock system-deps

install: $(STAMP)

# constraints.txt holds the exact version of every package the project and its dev extra
# pull in, as tested together: a fresh machine and CI install those, not whatever PyPI has
# newest that day (pyproject.toml keeps the ranges the code needs).
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

# Rewrites constraints.txt from a fresh resolve of pyproject.toml in a throwaway virtualenv
# (the newest releases pyproject.toml allows), never from .venv, which may hold leftovers
# and hand-installed tools. Then `make test` (it reinstalls .venv from the new file) before
# committing it (docs/development.md).
lock:
	set -e; tmp=$$(mktemp -d); trap 'rm -rf "$$tmp"' EXIT; \
	$(PYTHON) -m venv "$$tmp/venv"; \
	"$$tmp/venv/bin/python" -m pip install --quiet --upgrade pip; \
	"$$tmp/venv/bin/python" -m pip install --quiet -e '.[dev]'; \
	{ sed -n '/^# /p' constraints.txt; \
	  printf '#: resolved with %s\n' "$$("$$tmp/venv/bin/python" -c 'import platform as p; \
	    print(p.python_implementation(), p.python_version(), "on", p.system(), p.machine())')"; \
	  "$$tmp/venv/bin/python" -m pip freeze --exclude-editable; } > "$$tmp/constraints.txt"; \
	mv "$$tmp/constraints.txt" constraints.txt
	@git diff --stat -- constraints.txt 2>/dev/null || true

system-deps:
	@bash infra/system-deps.sh

demo: install system-deps
	$(VENV)/bin/agentstream demo $(DEMO_ARGS)

lint: install
	$(VENV)/bin/ruff check agentstream schemas streams agents infra bench tests
	$(VENV)/bin/ruff format --check agentstream schemas streams agents infra bench tests

typecheck: install
	$(VENV)/bin/mypy

unit: install
	$(PY) -m pytest tests/unit -q

integration: install system-deps
	$(PY) -m pytest tests/integration -q -n $(TEST_WORKERS)

test: install system-deps
	$(VENV)/bin/ruff check agentstream schemas streams agents infra bench tests
	$(VENV)/bin/ruff format --check agentstream schemas streams agents infra bench tests
	$(VENV)/bin/mypy
	$(PY) -m pytest -q -p no:cacheprovider --durations=15 -n $(TEST_WORKERS)

bench: install system-deps
	$(PY) -m bench $(BENCH_ARGS)

# The fault-injection suite (tests/chaos): every scenario K times, a JSON + Markdown report
# under var/chaos/. CHAOS_ARGS="--scenario worker_kill --runs 1 --messages 5000" runs less.
chaos: install system-deps
	$(PY) -m agentstream.infra.toxiproxy install
	$(PY) -m tests.chaos $(CHAOS_ARGS)

clean:
	-$(VENV)/bin/agentstream kafka stop
	rm -rf var
