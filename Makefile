# The two set-up commands in the README are `make reproduce` and `make test`.
PY ?= python3

.PHONY: install reproduce test lint bench

install:
	@# The CPU build of torch keeps a fresh install small; an existing torch (e.g. a CUDA build) is kept.
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "torch==2.13.0"
	$(PY) -m pip install -q -e ".[dev]"

reproduce: install
	emalab run --preset quick

test: install
	$(PY) -m pytest

lint:
	ruff check .

bench: install
	$(PY) -m benchmarks
