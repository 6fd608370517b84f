# Set-up is automatic: every target builds .venv from the project's own files first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TORCH_SPEC ?= torch==2.13.0
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install test lint demo model-card model-card-flow bench clean e2e

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# A bare `torch` would pull a multi-GB CUDA build: take the pinned CPU wheel unless torch is present.
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[test,plots,video]"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m ruff check src tests benchmarks examples
	$(PY) -m pytest -q

lint: $(STAMP)
	$(PY) -m ruff check src tests benchmarks examples

# Browser test of the web app (npinv serve): Debian's headless Chromium driven by Selenium; writes
# docs/webapp.png. Installs chromium and chromium-driver with apt when missing (needs root).
e2e: $(STAMP)
	test -x /usr/bin/chromium -a -x /usr/bin/chromedriver || { apt-get update -q && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium chromium-driver; }
	$(PY) -c "import selenium" 2>/dev/null || $(PY) -m pip install -q -e ".[e2e]"
	$(PY) -m pytest -q -s tests/e2e/browser_e2e.py

demo: $(STAMP)
	$(VENV)/bin/npinv demo --out out

# Measure the embedded model on held-out scenes and rewrite its MODEL_CARD.md (about 25 min on 2 cores).
model-card: $(STAMP)
	$(PY) -m npinv.modelcard

# The same for the embedded flow model (src/npinv/models/shapes_flow64).
model-card-flow: $(STAMP)
	$(PY) -m npinv.modelcard_flow

# Rerun the benchmarks afresh and regenerate BENCHMARKS.md from what this run measured (about an hour on
# 2 cores; after an interruption, `$(PY) benchmarks/run.py --out bench --resume` keeps the finished rows).
bench: $(STAMP)
	$(PY) benchmarks/run.py --out bench

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
