# loraplex: `make serve` serves cluster/local.yaml; `make test` runs the tests. Both install first.
PYTHON ?= python3
VENV ?= .venv
# torch goes in first and pinned: an unpinned torch pulls the CUDA build and gigabytes with it.
TORCH_VERSION ?= 2.13.0
CONFIG ?= cluster/local.yaml
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install serve test test-fast lint clean bench loadtest

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet "torch==$(TORCH_VERSION)"
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

serve: $(STAMP)
	$(BIN)/serve run $(CONFIG)

# Headless Chromium and its driver, from Debian, for tests/test_browser.py (the playground and
# the API docs in a real browser); chromium-driver pulls in chromium.
CHROMEDRIVER := /usr/bin/chromedriver
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

$(CHROMEDRIVER):
	$(SUDO) apt-get update
	$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y chromium chromium-driver

# A C++ compiler for torch.compile's inductor on a CPU (tests/test_compiled.py and the cache's).
CXX_COMPILER := /usr/bin/g++

$(CXX_COMPILER):
	$(SUDO) apt-get update
	$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y g++

test: $(STAMP) $(CHROMEDRIVER) $(CXX_COMPILER)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest

# The inner loop: everything but the tests marked slow (training runs, load tests, routing
# clusters of their own).
test-fast: $(STAMP) $(CHROMEDRIVER) $(CXX_COMPILER)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -m "not slow"

# The benchmark's ratios (loadtest/bench.py) into loadtest/reports/bench.{json,md}.
BENCH_ARGS ?=
bench: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m loadtest.bench $(BENCH_ARGS)

# A bounded Locust run against a service started from CONFIG (loadtest/run_locust.py) into
# loadtest/reports/locust/: Locust's CSV and HTML reports and summary.{json,md}.
LOADTEST_ARGS ?= --models flux,sdxl,z-image --users 8 --run-time 2m
loadtest: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m loadtest.run_locust --config $(CONFIG) $(LOADTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/lint-imports

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache

# The RayService's serveConfigV2 (cluster/kuberay/rayservice.yaml) written from
# cluster/production.yaml; tests/test_cluster_configs.py fails while the two differ.
.PHONY: kuberay
kuberay: $(STAMP)
	$(BIN)/python -m cluster.serve_config
