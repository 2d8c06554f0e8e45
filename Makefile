# The few commands people type. `make demo` and `make test` work on a fresh machine.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: venv services demo test lint bench clean

$(STAMP): requirements.txt requirements-dev.txt constraints.txt pyproject.toml
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

test: venv services
	$(VENV)/bin/ruff check .
	$(PY) -m pytest

lint: venv
	$(VENV)/bin/ruff check .

bench: venv services
	$(PY) bench/read.py
	$(PY) bench/migrate.py
	$(PY) bench/validate.py
	$(PY) bench/resync.py
	$(PY) bench/cache_warmup.py
	$(PY) bench/files.py

clean:
	rm -rf .cache demo_out bench/out airflow_home
