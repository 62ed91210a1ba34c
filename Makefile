# make demo: set up on a fresh machine, then run the main job.   make test: run the test suite.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: setup demo test lint
setup: $(VENV)/.installed

# torch==2.13.0 goes in first: a bare `torch` requirement would pull a multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	touch $@

demo: setup
	$(BIN)/gpt2 info --preset gpt2

test: setup
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check .
