# Set-up is automatic: every target builds .venv from the project's own files first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TORCH_SPEC ?= torch==2.13.0
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install test lint demo model-card bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# A bare `torch` would pull a multi-GB CUDA build: take the pinned CPU wheel unless torch is present.
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[test,plots,video]"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m ruff check src tests benchmarks
	$(PY) -m pytest -q

lint: $(STAMP)
	$(PY) -m ruff check src tests benchmarks

demo: $(STAMP)
	$(VENV)/bin/npinv demo --out out

# Measure the embedded model on held-out scenes and rewrite its MODEL_CARD.md (about 15 min on 2 cores).
model-card: $(STAMP)
	$(PY) -m npinv.modelcard

# Rerun the benchmarks and regenerate BENCHMARKS.md from what this run measured.
bench: $(STAMP)
	$(PY) benchmarks/run.py --out bench

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
