# riklet: `make run` starts the agent in the foreground, `make test` runs every check.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-riklet

.PHONY: run test install proto lint clean

run: install
	$(BIN)/riklet run

test: install
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/pytest -q

install: $(STAMP) common/pb/node_pb2.py

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

# Generated from the .proto at install time; never committed.
common/pb/node_pb2.py: common/pb/node.proto common/pb/rik_common.proto common/pb/rik_worker.proto $(STAMP)
	$(BIN)/python -c 'import common.pb as p; p.generate()'

proto: $(STAMP)
	$(BIN)/python -c 'import common.pb as p; p.generate()'

lint: install
	$(BIN)/ruff check .
	$(BIN)/mypy

clean:
	rm -rf $(VENV) common/pb/*_pb2*.py* .mypy_cache .ruff_cache .pytest_cache

.PHONY: bench-spine
bench-spine: install
	$(BIN)/python -m bench.spine --pods 100

.PHONY: bench-rik
bench-rik: install
	$(BIN)/python -m bench.rik --metric-seconds 120 --resolution 0.5 --instances 100

.PHONY: bench-proxy
bench-proxy: install
	$(BIN)/python -m bench.proxy
