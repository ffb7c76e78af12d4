# gitops-ml: every target installs what it needs first (uv, then the locked environment).
SHELL := /bin/bash
PYTHON ?= python3.11
UV_VERSION := 0.13.9
TOOLS := .cache/tools
UV := $(TOOLS)/bin/uv
VENV := .venv
export GITOPS_ML_HOME ?= $(CURDIR)/.state
export UV_PYTHON_DOWNLOADS := never

.PHONY: install demo stop test test-fast test-cluster bench compose-check es-up es-down clean

$(UV):
	$(PYTHON) -m venv $(TOOLS)
	$(TOOLS)/bin/pip install --quiet --disable-pip-version-check uv==$(UV_VERSION)

$(VENV)/.synced: $(UV) pyproject.toml uv.lock
	$(UV) sync --frozen --python $(PYTHON)
	touch $@

install: $(VENV)/.synced  ## create .venv from uv.lock

demo: install  ## init the demo repo, start Airflow + MLflow UI + server, commit, follow the run, predict
	$(VENV)/bin/gitops-ml demo

stop:  ## stop everything `make demo` started
	@if [ -x $(VENV)/bin/gitops-ml ]; then $(VENV)/bin/gitops-ml stack down; else echo "nothing installed"; fi

test: install  ## the whole suite (unit, integration, e2e with live Airflow); the cluster is `make test-cluster`
	$(VENV)/bin/python -m pytest tests --ignore=tests/cluster -p no:cacheprovider

# PostgreSQL 15 and Redis 7 come from Debian packages (`.ci/run` installs them on a fresh machine).
test-cluster: install  ## CeleryExecutor cluster on loopback: PostgreSQL, Redis, S3, MLflow server, ES, 2 workers, 2 replicas
	$(VENV)/bin/python -m pytest tests/cluster -p no:cacheprovider

test-fast: install  ## unit and integration tests only
	$(VENV)/bin/python -m pytest tests/unit tests/integration -p no:cacheprovider

.PHONY: lint format
lint: install  ## ruff (lint + format check) and mypy, configured in pyproject.toml
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

format: install  ## apply ruff's safe fixes and its formatting
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

bench: install  ## benchmarks: DAG parse time, commit-to-serving latency (also with a user model.py against the built-in model) (writes benchmarks/out/)
	$(VENV)/bin/python -m benchmarks.dag_parse
	$(VENV)/bin/python -m benchmarks.commit_to_serving
	$(VENV)/bin/python -m benchmarks.commit_to_serving --model-code
	$(VENV)/bin/python -m benchmarks.serving

es-up: install  ## a local single-node Elasticsearch 8.19 from Maven Central on 127.0.0.1:9200 (Java 17)
	$(VENV)/bin/python -m tests.es_node start

es-down:
	$(VENV)/bin/python -m tests.es_node stop

compose-check:  ## validate docker-compose.yml against the compose schema (no engine needed)
	docker-compose -f docker-compose.yml config -q

clean: stop
	rm -rf $(VENV) .cache .state
