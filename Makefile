# `make serve` runs the gateway (in-memory stats unless REDIS_URL is set);
# `make test` runs lint, types and the whole test suite, then `test-local-minimal`. Each sets up
# its venv on a fresh machine.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: serve test test-local-minimal test-faults lint typecheck pytest browser bench bench-request-path bench-overhead bench-instructions bench-local bench-kernels tune-kernels gpu-check redis clean

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

# The local backend as a user installs it: `.[local]` and the test runner only (no triton, no
# transformers, no openai), in its own venv. Its server tests and the kernel tests must pass
# or skip there. test_quant_quality (pure torch, ~45 s) runs in the main suite only.
LOCAL_VENV := .venv-local
$(LOCAL_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(LOCAL_VENV)
	$(LOCAL_VENV)/bin/pip install -q -e '.[local]' pytest pytest-asyncio pytest-timeout
	touch $@

test-local-minimal: $(LOCAL_VENV)/.installed
	$(LOCAL_VENV)/bin/python scripts/check_minimal_venv.py
	$(LOCAL_VENV)/bin/python -m pytest -q -p no:cacheprovider tests/local_server tests/kernels \
		--ignore=tests/kernels/test_quant_quality.py

serve: $(VENV)/.gateway-installed
	$(BIN)/gateway serve $(ARGS)

redis:
	bash scripts/ensure_redis.sh

browser:
	bash scripts/ensure_browser.sh

lint: $(VENV)/.dev-installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports --no-logo

typecheck: $(VENV)/.dev-installed
	$(BIN)/mypy gateway providers local_backend bench scripts

pytest: $(VENV)/.dev-installed redis browser
	$(BIN)/pytest -q $(PYTEST_ARGS)

test: lint typecheck pytest test-local-minimal

# The heavy fault-suite variants (marker faults_heavy): the fault matrix at the issue's sizes
# (200 MB bodies, 500 MB gzip bombs, 300 MB SSE lines), more fuzz examples, more hostile
# sockets. Kept out of `make test`, which runs the same faults at small sizes.
test-faults: $(VENV)/.dev-installed redis
	$(BIN)/pytest -q -m faults_heavy $(PYTEST_ARGS)

bench-request-path: $(VENV)/.dev-installed
	$(BIN)/python bench/request_path_faults.py --big

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

# on a CUDA GPU: sweep the MoE launch configs into local_backend/kernels/configs/
tune-kernels: $(VENV)/.dev-installed
	$(BIN)/python scripts/tune_moe.py

# the GPU checks (gpu tests, sweep, bench) with timeouts, logs and JSON in $(OUT) (./gpu_out)
gpu-check: $(VENV)/.dev-installed
	PYTHON=$(BIN)/python bash scripts/gpu_check_kernels.sh $(ARGS)

bench: bench-overhead bench-local bench-kernels

clean:
	rm -rf $(VENV) $(LOCAL_VENV) .mypy_cache .ruff_cache .pytest_cache
