# Everyday targets. The README's two commands are `make run` and `make test` in other words.
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: setup run test test-unit bench load lint typecheck stack-up stack-down compose-up compose-down

setup:  ## create .venv (and .venv-triton for the Triton tests)
	infra/local/setup.sh
	infra/triton/setup.sh

run:  ## the main job: local stack, worker and bridge (Ctrl-C stops it)
	infra/local/run.sh

test:  ## unit and integration tests on a private local stack
	infra/local/test.sh

test-unit:
	infra/local/test.sh tests/unit -q

bench:  ## the benchmarks, each against its baseline in the same run
	$(PY) -m bench.e2e
	$(PY) -m bench.bridge
	$(PY) -m bench.workers

load: BRIDGE ?= 127.0.0.1:8000
load:  ## the reference load on the bridge (compose's by default, BRIDGE=HOST:PORT); fails on a broken threshold
	$(VENV)/bin/inferstream load --target bridge --url http://$(BRIDGE) --model tiny --stages 10s:50,30s:50,10s:0 \
		--max-error-rate 0.01 --p95-ms 500 --p99-ms 1000 --min-rate 35

lint:
	$(VENV)/bin/ruff check streams agents topics models infra tests bench

typecheck:  ## mypy over streams, agents, topics, models and infra/local (config: [tool.mypy] in pyproject.toml)
	$(VENV)/bin/mypy

stack-up:  ## the local stack alone (dev commands: `python -m infra.local --help`)
	$(PY) -m infra.local stack up

stack-down:
	$(PY) -m infra.local stack down

compose-up:  ## the production stack (needs Docker)
	docker compose up -d --build

compose-down:
	docker compose down
