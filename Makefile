# Everyday targets. The README's two commands are `make run` and `make test` in other words.
# `make help` lists every target with the `## ` comment on its line.
VENV := .venv
PY := $(VENV)/bin/python
VERSION := $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
IMAGE ?= inferstream
TARGET ?= cpu
OVERLAY ?= staging

.DEFAULT_GOAL := help

.PHONY: setup run test test-unit bench load lint typecheck stack-up stack-down compose-up compose-down help image deploy coverage clean

help:  ## this list
	@awk -F':.*## ' '/^[a-zA-Z_-]+:.*## / {printf "  %-12s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

setup:  ## create .venv (and .venv-triton for the Triton tests)
	infra/local/setup.sh
	infra/triton/setup.sh

run:  ## the main job: local stack, worker and bridge (Ctrl-C stops it)
	infra/local/run.sh

test:  ## unit and integration tests on a private local stack
	infra/local/test.sh

test-unit:  ## the unit tests alone (no services)
	infra/local/test.sh tests/unit -q

bench:  ## the benchmarks, each against its baseline in the same run
	$(PY) -m bench.e2e
	$(PY) -m bench.bridge
	$(PY) -m bench.workers

load: BRIDGE ?= 127.0.0.1:8000
load:  ## the reference load on the bridge (compose's by default, BRIDGE=HOST:PORT); fails on a broken threshold
	$(VENV)/bin/inferstream load --target bridge --url http://$(BRIDGE) --model tiny --stages 10s:50,30s:50,10s:0 \
		--max-error-rate 0.01 --p95-ms 500 --p99-ms 1000 --min-rate 35

lint:  ## ruff over the code, the tests and the tooling
	$(VENV)/bin/ruff check streams agents topics models infra tests bench

typecheck:  ## mypy over streams, agents, topics, models and infra/local (config: [tool.mypy] in pyproject.toml)
	$(VENV)/bin/mypy

stack-up:  ## the local stack alone (dev commands: `python -m infra.local --help`)
	$(PY) -m infra.local stack up

stack-down:  ## stop the local stack
	$(PY) -m infra.local stack down

compose-up:  ## the production stack (needs Docker)
	docker compose up -d --build

compose-down:  ## stop the production stack (volumes kept)
	docker compose down

image:  ## build the runtime image: TARGET=cpu (default) or gpu, tagged $(IMAGE):$(VERSION)-$(TARGET)
	docker build --target $(TARGET) --build-arg VERSION=$(VERSION) \
		--build-arg REVISION=$$(git rev-parse HEAD) -t $(IMAGE):$(VERSION)-$(TARGET) .

deploy:  ## kubectl apply -k infra/k8s/overlays/$(OVERLAY) (OVERLAY=staging by default; dev, prod)
	@test -d infra/k8s/overlays/$(OVERLAY) || { echo "no overlay infra/k8s/overlays/$(OVERLAY)" >&2; exit 1; }
	$(VENV)/bin/kubectl apply -k infra/k8s/overlays/$(OVERLAY)

coverage:  ## the whole suite with branch coverage of streams, agents and topics, subprocesses included; fails under [tool.coverage.report] fail_under
	infra/local/test.sh --cov --cov-report=term --cov-report=xml

clean:  ## caches and build outputs (keeps .venv, models/repository and the local stack's state)
	rm -rf build *.egg-info .pytest_cache .ruff_cache .mypy_cache .coverage .coverage.* htmlcov coverage.xml
	find . -path ./.venv -prune -o -path ./.venv-triton -prune -o -name __pycache__ -type d -exec rm -rf {} +
