# Everyday tasks. `make run` starts a whole gateway on this machine; `make test` runs every check CI runs.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
BUF := npm exec --yes --package=@bufbuild/buf@1.75.0 -- buf

.PHONY: install install-dev clients run test lint format typecheck generate check-generated buf-lint buf-breaking deploy-validate pytest bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install --quiet -e .
	touch $@

$(VENV)/.installed-dev: $(BIN)/python pyproject.toml
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $@

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

## clients: the Node.js clients the acceptance tests run (Codex CLI, Vercel AI SDK), exactly as
## tests/clients/package-lock.json locks them.
CLIENTS := tests/clients
clients: $(CLIENTS)/node_modules/.package-lock.json
$(CLIENTS)/node_modules/.package-lock.json: $(CLIENTS)/package.json $(CLIENTS)/package-lock.json
	npm ci --prefix $(CLIENTS) --no-audit --no-fund

## run: the gateway on http://127.0.0.1:8080/v1 with embedded SQLite and the echo demo hub.
## Use a real model server with: make run HUB=http://127.0.0.1:8000/v1
HUB ?=
run: install
	@if [ -n "$(HUB)" ]; then $(BIN)/respgw local --hub-url "$(HUB)"; else $(BIN)/respgw local --echo-hub; fi

## test: lint, types, contracts, manifests and every test suite.
test: install-dev lint typecheck check-generated buf-lint buf-breaking deploy-validate pytest

lint:
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format:
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

typecheck:
	$(BIN)/mypy

generate:
	PYTHON=$(BIN)/python scripts/generate.sh

check-generated:
	PYTHON=$(BIN)/python scripts/generate.sh --check

buf-lint:
	$(BUF) lint
	$(BUF) format --diff --exit-code

## buf-breaking: the v1 packages stay wire- and source-compatible with v1 as first published
## (the repository's first commit); a breaking change needs a v2 package.
buf-breaking:
	$(BUF) breaking --against ".git#ref=$$(git rev-list --max-parents=0 HEAD)"

deploy-validate:
	PATH="$(abspath $(BIN)):$$PATH" scripts/validate-deploy.sh

pytest: clients
	$(BIN)/pytest -q -p no:cacheprovider

bench: install-dev
	$(BIN)/python -m bench.bench_router
	$(BIN)/python -m bench.bench_state
	$(BIN)/python -m bench.bench_memory

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
