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

SHIM := services/manager/process/riklet-shim

install: $(STAMP) common/pb/node_pb2.py common/pb/ctrd/__init__.py $(SHIM)

# The per-pod shim, a small C program (gcc and libc6-dev); rebuilt when its source changes.
$(SHIM): services/manager/process/shim.c | $(STAMP)
	$(BIN)/python -m services.manager.process.build

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

# Generated from the .proto at install time; never committed.
common/pb/node_pb2.py: common/pb/node.proto common/pb/rik_common.proto common/pb/rik_worker.proto $(STAMP)
	$(BIN)/python -c 'import common.pb as p; p.generate()'

# containerd's API stubs, from containerd's own .proto files (Debian's
# golang-github-containerd-containerd-dev, unpacked into .cache/ when not installed). Without
# them the agent runs, and pods with an image fail with the reason.
common/pb/ctrd/__init__.py: $(STAMP)
	-@$(MAKE) --no-print-directory containerd-api || \
	  echo "note: containerd API stubs not generated; pods with an image fail until 'make containerd-api' works"

.PHONY: containerd-api
containerd-api: $(STAMP)
	@if [ -z "$$($(BIN)/python -c 'import common.pb.containerd as c; print(c.find_source() or "")')" ]; then \
	  echo "fetching containerd's API protos (Debian: golang-github-containerd-containerd-dev)"; \
	  rm -rf .cache/debs && mkdir -p .cache/debs && cd .cache/debs && \
	  apt-get download golang-github-containerd-containerd-dev golang-github-gogo-googleapis-dev \
	    2>&1 | grep -v 'unsandboxed' ; \
	  for f in *.deb; do dpkg -x "$$f" ../containerd-api; done; fi
	$(BIN)/python -m common.pb.containerd

# A wheel (py3-none-<platform>: it carries the compiled shim) and an sdist into dist/, built with
# this venv's setuptools and grpcio-tools (no network). The wheel is built from the sdist, so
# the sdist is known to build it. containerd's API stubs go in when their .proto files are found
# (`make containerd-api`); the .proto files themselves never do.
.PHONY: dist
dist: install
	rm -rf dist
	RIKLET_CONTAINERD_API="$${RIKLET_CONTAINERD_API:-$$($(BIN)/python -c 'import common.pb.containerd as c; print(c.find_source() or "")')}" \
	  $(BIN)/python -m build --no-isolation --outdir dist .

proto: $(STAMP)
	$(BIN)/python -c 'import common.pb as p; p.generate()'

lint: install
	$(BIN)/ruff check .
	$(BIN)/mypy

clean:
	rm -rf $(VENV) dist build common/pb/*_pb2*.py* common/pb/ctrd .cache .mypy_cache .ruff_cache .pytest_cache $(SHIM)

.PHONY: bench-spine
bench-spine: install
	$(BIN)/python -m bench.spine --pods 100

.PHONY: bench-rik
bench-rik: install
	$(BIN)/python -m bench.rik --metric-seconds 120 --resolution 0.5 --instances 100

# Machine-wide CPU added over a direct connection, per request / GiB / new connection / UDP echo,
# for HAProxy, nginx, riklet kernel and userspace modes side by side; failed requests during
# kill -9 of every proxy process. About 8 minutes; --quick for a smoke run.
.PHONY: bench-proxy
bench-proxy: install
	$(BIN)/python -m bench.proxy --reps 3

# The per-pod shim alone: median spawn-to-running of a `sleep` pod, and its PSS.
# The kernel data path's endpoint health checks alone: CPU of probing 1,000 endpoints every 2 s.
.PHONY: bench-health
bench-health: install
	$(BIN)/python -m bench.health_cost --endpoints 1000 --interval 2 --seconds 30

.PHONY: bench-shim
bench-shim: install
	$(BIN)/python -m bench.shim --spawns 50

.PHONY: bench-containerd
bench-containerd: install
	$(BIN)/python -m bench.containerd --containers 50

# The agent as a systemd service (deploy/riklet.service): a venv in $(PREFIX), the unit,
# /etc/riklet/riklet.yaml when absent. DESTDIR stages everything under a directory instead.
# uninstall-system keeps /etc/riklet and /var/lib/riklet.
PREFIX ?= /opt/riklet
DESTDIR ?=

.PHONY: install-system uninstall-system
install-system:
	deploy/install.sh --prefix $(PREFIX) --python $(PYTHON) $(if $(DESTDIR),--root $(DESTDIR))

uninstall-system:
	deploy/install.sh --uninstall --prefix $(PREFIX) $(if $(DESTDIR),--root $(DESTDIR))

.PHONY: bench-proxy-restart
bench-proxy-restart: install
	$(BIN)/python -m bench.proxy_restart --rounds 10

# The fault suite (bench/chaos): kill -9 of each service, of supervisord and of everything under
# a churn of pod operations, the delete/re-apply race, input bombs, stream and connection floods.
# A few minutes; exits 1 when any pod was lost, duplicated or orphaned, or a check failed.
.PHONY: chaos
chaos: install
	$(BIN)/python -m bench.chaos --ops 150 --pods 10 --seed 1

# Health probes' cost: 1,000 pods with an httpGet readiness and a tcpSocket liveness probe every
# 10 s, the agent's CPU against the same pods without probes. About 6 minutes.
.PHONY: bench-probes
bench-probes: install
	$(BIN)/python -m bench.probes --pods 1000 --period 10 --seconds 60

# Issue 14's figures at 0, 100, 1000 and 5000 `sleep` process pods (idle CPU, PSS per pod and of
# the services, Apply->Running, bulk pods/s, Apply call, List, /metrics, delete all, leftovers)
# against the goals; the markdown goes to bench/last-scale.md. Stops before an N whose pods
# would not fit in memory. About 10 minutes; --quick for a smoke run.
.PHONY: bench-scale
bench-scale: install
	$(BIN)/python -m bench.scale $(SCALE_ARGS)
