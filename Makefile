# Two entry points, each safe on a fresh clone: `make demo` (the main job) and `make test`.
# Both create .venv on first use.  torch is pinned to the CPU build this machine ships;
# on a GPU machine install your CUDA torch into .venv first and the pin is skipped.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
TORCH  ?= torch==2.13.0

.PHONY: setup demo test test-fast browser

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@echo "setting up $(VENV) (log: $(VENV)/install.log)"
	$(PYTHON) -m venv $(VENV)
	@( $(BIN)/pip install -q --upgrade pip && \
	   ( $(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q $(TORCH) ) && \
	   $(BIN)/pip install -q -e '.[test]' ) > $(VENV)/install.log 2>&1 \
	   || { tail -n 40 $(VENV)/install.log; echo "setup failed: see $(VENV)/install.log"; exit 1; }
	touch $@

demo: setup
	$(BIN)/saekit pipeline --out runs/demo

browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || bash scripts/install-browser.sh

test: setup browser
	$(BIN)/python -m pytest -q -ra

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow"
