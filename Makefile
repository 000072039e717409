# qjob-operator. The two commands a newcomer needs:
#   make demo   the main job: local control plane + chart + operator + real jobrunner, end to end
#   make test   every test suite (unit, runner on CPU, integration on the real control plane, e2e)
# Both set up what they need (virtualenv outside the checkout, Go-built Kubernetes binaries in
# ~/.cache/qjob-operator) on first use; later runs reuse them.
SHELL := /bin/bash
.DEFAULT_GOAL := help
PY = "$$(hack/venv.sh)/bin/python"

include hack/localcluster/cluster.mk

.PHONY: help venv crds lint test test-unit test-runner test-integration test-e2e demo demo-down bench soak

help:
	@echo "make demo        run the end-to-end demo (first run builds Kubernetes binaries: ~25 min)"
	@echo "make test        run all tests (after make lint: ruff format --check + ruff check)"
	@echo "make crds        regenerate crds/ (and the chart's copy) from api/qjob_api"
	@echo "make bench       operator benchmarks on the local control plane"
	@echo "make soak        fuzz (1,000 specs), fault and tenancy suites; figures in benchmarks/results/"
	@echo "make cluster-up / cluster-down   a local control plane with simulated GPU nodes"

venv:
	@hack/venv.sh >/dev/null

crds:
	@$(PY) -m qjob_api.crd > crds/qjob.dev_quantizationjobs.yaml
	@mkdir -p charts/qjob-operator/crds && cp crds/*.yaml charts/qjob-operator/crds/
	@echo "crds/ and charts/qjob-operator/crds/ regenerated"

lint:
	@"$$(hack/venv.sh)/bin/ruff" format --check .
	@"$$(hack/venv.sh)/bin/ruff" check .

test: lint cluster-binaries
	@$(PY) -m pytest -q -ra

test-unit:
	@$(PY) -m pytest -q tests/unit

test-runner:
	@$(PY) -m pytest -q tests/runner

test-integration: cluster-binaries
	@$(PY) -m pytest -q -ra tests/integration

test-e2e: cluster-binaries
	@$(PY) -m pytest -q -ra tests/e2e

bench: cluster-binaries
	@$(PY) benchmarks/operator_scale.py

soak: cluster-binaries
	@$(PY) benchmarks/fuzz_specs.py
	@$(PY) benchmarks/fault_suite.py
	@$(PY) benchmarks/tenancy_suite.py

demo: cluster-binaries
	@$(PY) -m qjob_dev.demo

demo-down: cluster-down
