# Set-up is automatic: every target builds .venv from the project's own files first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TORCH_SPEC ?= torch==2.13.0
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install test lint demo clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# A bare `torch` would pull a multi-GB CUDA build: take the pinned CPU wheel unless torch is present.
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[test,plots]"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m ruff check src tests
	$(PY) -m pytest -q

lint: $(STAMP)
	$(PY) -m ruff check src tests

demo: $(STAMP)
	$(VENV)/bin/npinv demo --out out

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
