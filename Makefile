# The two commands:  make run   (the whole service on embedded defaults)
#                    make test  (create the environment, run every test)
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
PORT   ?= 8000
export PORT

.PHONY: run test venv migrate clean

$(BIN)/.installed: setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

venv: $(BIN)/.installed

migrate: venv
	$(BIN)/orchestrator db upgrade

## run: web on $(PORT) + an sdxl worker + a wan worker + beat, on SQLite under ./var/. Ctrl-C stops all.
run: migrate
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/honcho -f Procfile start -p $(PORT) web worker_sdxl worker_wan worker_maintenance beat

## test: the whole suite (needs PostgreSQL and Redis on 127.0.0.1; .ci/run starts them).
test: venv
	$(BIN)/python -m pytest $(PYTEST_ARGS)

clean:
	rm -rf var test-artifacts .pytest_cache
