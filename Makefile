# Corral: `make run` starts the platform, `make test` runs the tests. Both install what they need.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PROTOS := $(shell find protos -name '*.proto')

.PHONY: run runtime test unit integration e2e bench chaos proto envoy image lint typecheck clean help

help:
	@echo "make run    start the five services (embedded PostgreSQL and Redis unless CORRAL_DATABASE_URL / CORRAL_REDIS_URL are set), restarting any that dies"
	@echo "make test   run the unit, integration and end-to-end tests"
	@echo "make bench  print benchmark figures as JSON"
	@echo "make chaos  kill each service, PostgreSQL and Redis under load, then overload; print what callers saw as JSON"
	@echo "make proto  regenerate Python code and type stubs from protos/"
	@echo "make envoy  regenerate deploy/envoy/envoy*.yaml from the method access table and edge.toml"
	@echo "make image  build the container image without Docker (mmdebstrap, umoci): build/image/oci, as root"
	@echo "make lint   buf lint, buf breaking against the previous commit, ruff, import contracts, mypy --strict"

$(VENV)/.installed: pyproject.toml
	@sh scripts/setup-sandbox.sh >&2
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "installing Python dependencies into $(VENV) (first run only)..." >&2
	@$(PY) -m pip install -q --upgrade pip
	@$(PY) -m pip install -q -e '.[dev]'
	@touch $@

.proto.stamp: $(VENV)/.installed $(PROTOS) scripts/genproto.py
	@$(PY) scripts/genproto.py >&2
	@touch $@

proto: .proto.stamp

# The agents' runtime (/opt/corral-runtime/<id>: interpreter, standard library, corral.sdk), which
# the bwrap and gvisor sandboxes run. Checked on every run: a second run only finds it there.
runtime: .proto.stamp
	@$(PY) scripts/setup_runtime.py

# The edge's configs: routes from services/common/auth/methods.py, the rest from
# deploy/envoy/edge.toml (tests/unit/test_deploy.py fails while they are stale).
envoy: $(VENV)/.installed
	@$(PY) scripts/genenvoy.py

# The container image (deploy/docker/README.md): the Dockerfile's image, built without a container
# daemon into an OCI image layout under build/image, then unpacked and checked. Not part of `test`.
IMAGE_TAG ?= $(shell sed -n 's/^version = "\(.*\)"$$/\1/p' pyproject.toml)
image: .proto.stamp
	@sh deploy/docker/build-image.sh build/image $(PY) $(IMAGE_TAG)

run: .proto.stamp runtime
	@$(PY) -m services.launcher

test: .proto.stamp runtime
	$(PY) -m pytest -q tests

unit: .proto.stamp
	$(PY) -m pytest -q tests/unit

integration: .proto.stamp runtime
	$(PY) -m pytest -q tests/integration

e2e: .proto.stamp runtime
	$(PY) -m pytest -q tests/e2e

bench: .proto.stamp
	@$(PY) -m bench

# Faults under load (bench/chaos.py): each service, PostgreSQL and Redis killed in turn while
# multi-turn sessions run, then an overload; prints JSON. A short version runs in `make test`.
chaos: .proto.stamp runtime
	@$(PY) -m bench.chaos

# buf breaking compares protos/ with the previous commit, which buf builds from git: whatever an
# import needs must be committed (hence the vendored protos/third_party). Both sides are built to
# images first, so a change in how protos/ is split into buf modules is not itself a difference.
BUF := ../$(VENV)/bin/buf
lint: .proto.stamp
	cd protos && $(BUF) lint
	@if ! before=$$(git rev-parse -q --verify 'HEAD~1^{commit}'); then \
	  echo "buf breaking: skipped, this checkout has no previous commit (a shallow clone?);" \
	    "run 'git fetch --deepen=1' to compare with it" >&2; \
	else \
	  images=$$(mktemp -d) && trap 'rm -rf "$$images"' EXIT && cd protos && \
	  $(BUF) build -o "$$images/now.binpb" && \
	  $(BUF) build "../.git#ref=$$before,subdir=protos" -o "$$images/before.binpb" && \
	  $(BUF) breaking "$$images/now.binpb" --against "$$images/before.binpb" && \
	  echo "buf breaking: no breaking change since $$(git rev-parse --short $$before)"; \
	fi
	$(VENV)/bin/ruff check corral services tests bench examples scripts
	$(VENV)/bin/lint-imports --no-cache --no-logo
	@$(MAKE) --no-print-directory typecheck

# Strict type checking; each agent bundle holds a module named `agent`, so each is a run of its own.
typecheck: .proto.stamp
	$(VENV)/bin/mypy
	@for bundle in examples/*/ bench/agents/*/; do $(VENV)/bin/mypy --no-namespace-packages "$$bundle" || exit 1; done

clean:
	rm -rf .proto.stamp corral/*/v1 .corral
