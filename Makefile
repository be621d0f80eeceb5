# The two commands:  make run   (the whole service on embedded defaults)
#                    make test  (create the environment, run every test)
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
PORT   ?= 8000
export PORT

.PHONY: run test venv venv-models migrate demo bench clean

# Two stamps: the service and its dev tools (`make run` needs no more), then the `models`
# extra (torch, diffusers, transformers: the model-backend tests) on top for `make test`.
$(BIN)/.installed: setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

$(BIN)/.installed-models: $(BIN)/.installed
	$(BIN)/python -m pip install --quiet -e '.[dev,models]'
	touch $@

venv: $(BIN)/.installed

venv-models: $(BIN)/.installed-models

migrate: venv
	$(BIN)/orchestrator db upgrade

## run: web on $(PORT) + an sdxl worker + a wan worker + beat, on SQLite under ./var/. Ctrl-C stops all.
## Logs are text for the human at the terminal (LOG_FORMAT=json for JSON lines).
run: migrate
	LOG_FORMAT="$${LOG_FORMAT:-text}" PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/honcho -f Procfile start -p $(PORT) web worker_sdxl worker_wan worker_maintenance beat

## chromium: the console's browser test drives Debian's chromium (never a downloaded browser).
CHROMIUM ?= /usr/bin/chromium
$(CHROMIUM):
	@echo "installing chromium for tests/test_console.py (apt-get; needs root)"
	DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends chromium \
	  || { apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends chromium; }

## test: the whole suite (needs PostgreSQL and Redis on 127.0.0.1; .ci/run starts them).
test: venv-models $(CHROMIUM)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

## demo: against a running service on $(PORT): a fresh user submits every job type
## (DEMO_ARGS, e.g. "--per-type 1 --types video_fast"), one progress bar per job, then the links.
demo: venv
	$(BIN)/python examples/demo.py --url http://127.0.0.1:$(PORT) $(DEMO_ARGS)

## bench: the benchmark suite (bench/suite.py; a few minutes, not part of `make test`). Starts a
## private PostgreSQL and Redis, gunicorn and Celery workers on loopback, measures the service
## against same-run baselines, stops them, and rewrites its section of bench/RESULTS.md
## (BENCH_ARGS, e.g. "--runs 5 --connections 32"). Needs PostgreSQL and Redis installed.
WRK ?= $(or $(shell command -v wrk 2>/dev/null),/usr/bin/wrk)
$(WRK):
	@echo "installing wrk for make bench (apt-get; needs root)"
	DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends wrk \
	  || { apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends wrk; }

# py-spy profiles the service under load; the bench's only extra package.
$(BIN)/py-spy: $(BIN)/.installed
	$(BIN)/python -m pip install --quiet py-spy
	touch $@

bench: venv $(WRK) $(BIN)/py-spy
	$(BIN)/python -m bench.suite $(BENCH_ARGS)

clean:
	rm -rf var test-artifacts .pytest_cache
