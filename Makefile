# Two commands do everything on a fresh machine (see README.md). Both are idempotent.
PY := .venv/bin/python
PYTEST_ARGS ?=

.PHONY: setup demo test lint

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
