# `make` lists the targets.
.DEFAULT_GOAL := help
PY := .venv/bin/python

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-12s %s\n", $$1, $$2}'

install: ## install system packages and the virtualenv, with the test tools
	./scripts/install --test

serve: install ## run ccci (web + worker) on 127.0.0.1:8080
	$(PY) -m ccci serve

test: ## run the test suite
	./scripts/test

lint: ## ruff check and format check
	.venv/bin/ruff check . && .venv/bin/ruff format --check .

typecheck: ## mypy over ccci and the benchmarks (configured in pyproject.toml)
	.venv/bin/mypy

check: lint typecheck test ## everything CI runs (.ci/run)

format: ## format the code
	.venv/bin/ruff format . && .venv/bin/ruff check --fix .

bench: ## run the benchmarks (results under bench/results/)
	$(PY) bench/webhook_bench.py && $(PY) bench/vm_bench.py && $(PY) bench/gitea_bench.py

soak: ## the VM leak soak (slow; not in the default suite)
	$(PY) -m pytest -m soak tests/vm

chaos: install ## the chaos drill: 200 random SIGKILLs, then every invariant checked (slow; CHAOS_ARGS=--help)
	$(PY) -m tests.chaos.drill $(CHAOS_ARGS)

.PHONY: help install serve test lint typecheck check format bench soak chaos
