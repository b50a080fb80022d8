# The two set-up commands in the README are `make reproduce` and `make test`.
PY ?= python3

.PHONY: install reproduce test lint bench browser

install:
	@# The CPU build of torch keeps a fresh install small; an existing torch (e.g. a CUDA build) is kept.
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "torch==2.13.0"
	$(PY) -m pip install -q -e ".[dev]"

reproduce: install
	emalab run --preset quick

test: install browser
	$(PY) -m pytest

# The inspector's browser test drives Debian's headless Chromium through chromedriver.
browser:
	@{ command -v chromium && command -v chromedriver; } >/dev/null || \
	  (apt-get update -qq && apt-get install -y -qq chromium chromium-driver >/dev/null)

lint:
	ruff check .

bench: install
	$(PY) -m benchmarks
