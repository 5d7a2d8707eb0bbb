# Two commands do everything on a fresh machine (see README.md). Both are idempotent.
PY := .venv/bin/python
# -n auto: tests spread over the cores (pytest-xdist); those that start Ray run one after another in one worker
# (tests/conftest.py). --durations: the slowest tests, at the end of every run (CI time is budgeted).
PYTEST_ARGS ?= -n auto --dist loadgroup --durations=20

.PHONY: setup demo test lint reliability image image-push manifests lock

setup:
	@./scripts/setup.sh

demo: setup
	$(PY) -m pipelines.cli demo $(DEMO_ARGS)

# Every tier that can run here: unit, integration (real S3/STAC servers, Ray), slow (training).
# gpu tests skip themselves without CUDA. pytest exits 5 when nothing was collected, which fails this target.
test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

lint: setup
	.venv/bin/ruff check .
	.venv/bin/mypy

# The reliability scenarios (chaos, bad inputs, security, training resume), then docs/reliability.md's outcome table
# generated from what they measured (each scenario appends one JSON line to build/reliability/outcomes.jsonl).
RELIABILITY_TESTS ?= tests/reliability
reliability: setup
	rm -f build/reliability/outcomes.jsonl
	$(PY) -m pytest $(RELIABILITY_TESTS) $(PYTEST_ARGS)
	$(PY) -m tests.reliability.report

# -- Cluster images (cluster/image/, cluster/README.md). IMAGE is the one parameter: the CPU image is $(IMAGE), the
# GPU image $(IMAGE)-cuda, and `make manifests` writes the manifests of cluster/ with both put in.
IMAGE ?= ghcr.io/earthgpt/earthgpt-archive:0.1.0
SHIPPED_IMAGE := ghcr.io/earthgpt/earthgpt-archive:0.1.0

image:
	docker build -f cluster/image/Dockerfile -t $(IMAGE) .
	docker build -f cluster/image/Dockerfile.cuda -t $(IMAGE)-cuda .

image-push: image
	docker push $(IMAGE)
	docker push $(IMAGE)-cuda

manifests:
	@mkdir -p build/manifests
	@for f in cluster/kuberay/*.yaml cluster/schedule/*.yaml; do \
	  sed 's#$(SHIPPED_IMAGE)#$(IMAGE)#g' $$f > build/manifests/$$(basename $$f); done
	@echo "manifests with image $(IMAGE) in build/manifests/"

# The images' locked dependencies, resolved for Linux x86_64 / Python 3.11 (with the uv that `make setup` installs
# in .venv, else the uv on PATH).
UV := $(if $(wildcard .venv/bin/uv),.venv/bin/uv,uv)
lock:
	@mkdir -p build
	printf 'torch==2.13.0\nray==2.60.0\n' > build/lock-constraints.txt
	$(UV) pip compile pyproject.toml --python-version 3.11 --python-platform x86_64-manylinux_2_28 \
	  -c build/lock-constraints.txt --no-header --annotation-style line -o build/requirements.lock
	{ sed -n '1,2p' cluster/image/requirements.lock; cat build/requirements.lock; } > cluster/image/requirements.lock.new
	mv cluster/image/requirements.lock.new cluster/image/requirements.lock
