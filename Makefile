# The few commands people type. `make demo` and `make test` work on a fresh machine.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: venv services demo airflow airflow-stop test lint bench loadtest clean

$(STAMP): requirements.txt requirements-dev.txt requirements-sample.txt constraints.txt pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-dev.txt -c constraints.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $@

venv: $(STAMP)

services:
	bash scripts/services.sh

demo: venv services
	$(PY) scripts/demo.py

# A local Airflow 3 (api-server, scheduler, dag-processor, triggerer) at http://127.0.0.1:$(AIRFLOW_PORT).
AIRFLOW_PORT ?= 8080
EXECUTOR ?= local
WORKERS ?= 2
airflow: venv services
	$(PY) scripts/airflow_stack.py start --port $(AIRFLOW_PORT) --executor $(EXECUTOR) --workers $(WORKERS)

airflow-stop: venv
	$(PY) scripts/airflow_stack.py stop

test: venv services
	$(VENV)/bin/ruff check .
	PYTHONPATH=include $(VENV)/bin/lint-imports
	$(PY) -m pytest

lint: venv
	$(VENV)/bin/ruff check .
	PYTHONPATH=include $(VENV)/bin/lint-imports

bench: venv services
	$(PY) bench/read.py
	$(PY) bench/migrate.py
	$(PY) bench/memory.py
	$(PY) bench/validate.py
	$(PY) bench/resync.py
	$(PY) bench/cache_warmup.py
	$(PY) bench/files.py

# PocketBase against the game service on the migrated PostgreSQL + Redis, in one command (USERS,
# DURATION, SPAWN_RATE...: see bench/loadtest/run.py); prints the JSON report's path last.
loadtest: venv services
	$(PY) bench/loadtest/run.py

clean:
	rm -rf .cache demo_out bench/out airflow_home
