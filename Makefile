# `make serve` runs the gateway (in-memory stats unless REDIS_URL is set);
# `make test` runs lint, types and the whole test suite. Each sets up .venv on a fresh machine.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: serve test lint typecheck pytest bench bench-overhead bench-instructions bench-local bench-kernels redis clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# The gateway alone installs light (no torch).
$(VENV)/.gateway-installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e .
	touch $@

# Tests need the local backend (torch CPU wheel, pinned) and the dev tools.
$(VENV)/.dev-installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[local,dev]'
	touch $@ $(VENV)/.gateway-installed

serve: $(VENV)/.gateway-installed
	$(BIN)/gateway serve $(ARGS)

redis:
	bash scripts/ensure_redis.sh

lint: $(VENV)/.dev-installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports --no-logo

typecheck: $(VENV)/.dev-installed
	$(BIN)/mypy gateway providers local_backend bench scripts

pytest: $(VENV)/.dev-installed redis
	$(BIN)/pytest -q $(PYTEST_ARGS)

test: lint typecheck pytest

# The concurrent cases use wrk, the instruction counts valgrind (apt-get install wrk valgrind);
# BASELINE=path/to/another/checkout measures it alongside.
bench-overhead: $(VENV)/.dev-installed
	$(BIN)/python bench/overhead.py $(if $(BASELINE),--baseline $(BASELINE))

bench-instructions: $(VENV)/.dev-installed
	$(BIN)/python bench/cpu_instructions.py $(if $(BASELINE),--baseline $(BASELINE))

bench-local: $(VENV)/.dev-installed
	$(BIN)/python bench/local_decode.py

bench-kernels: $(VENV)/.dev-installed
	$(BIN)/python bench/moe_kernels.py

bench: bench-overhead bench-local bench-kernels

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
