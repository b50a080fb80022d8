# The two set-up commands in the README are `make reproduce` and `make test`.
PY ?= python3

.PHONY: install reproduce test lint bench browser constraints gpucheck

install:
	@# The CPU build of torch keeps a fresh install small; an existing torch (e.g. a CUDA build) is kept.
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "torch==2.13.0"
	@# constraints.txt: the exact versions the tests pass with, so a fresh install cannot resolve others.
	$(PY) -m pip install -q -c constraints.txt -e ".[dev]"

# Re-pin after deliberately upgrading a dependency and seeing the tests pass.
constraints:
	@{ echo "# Exact versions the test suite passes with (pip freeze of the test environment)."; \
	   $(PY) -m pip freeze | grep -v -e "^-e" -e "@ file" -e "^emalab" | sed -E 's/^(torch==[^+]*)\+.*/\1/'; } > constraints.txt

# The 7B-architecture GPU check (random weights; about 5 minutes on one H100/H200).
gpucheck:
	$(PY) -m benchmarks.gpu_check --device cuda --gpu7b --out benchmarks/results/gpucheck.json

reproduce: install
	emalab run --preset quick

# The real-model tier runs in processes of its own, and the NPO run whose peak RSS is held to 8 GB in a
# process of its own: ru_maxrss is the process's high-water mark, so in a shared process the bar would
# measure whichever earlier test peaked highest (8.2 GB with the unit tier, over 8 with the other slow tests).
test: install browser
	$(PY) -m pytest -m "not slow"
	$(PY) -m pytest -m slow --deselect tests/test_training_real.py::test_npo_steps_lower_forget_logprob_on_real_model
	$(PY) -m pytest -m slow tests/test_training_real.py

# The inspector's browser test drives Debian's headless Chromium through chromedriver.
browser:
	@{ command -v chromium && command -v chromedriver; } >/dev/null || \
	  (apt-get update -qq && apt-get install -y -qq chromium chromium-driver >/dev/null)

lint:
	ruff check .

bench: install
	$(PY) -m benchmarks
