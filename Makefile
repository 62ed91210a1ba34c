# make demo: set up on a fresh machine, then run the main job.   make test: run the test suite.
# make docs: build the documentation site (docs/, mkdocs.yml) into site/, warnings as errors.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: setup browser demo test lint docs
setup: $(VENV)/.installed

# torch==2.13.0 goes in first: a bare `torch` requirement would pull a multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	touch $@

demo: setup
	$(BIN)/gpt2 prepare shakespeare --vocab-size 4096 --out data/shakespeare --overwrite
	$(BIN)/gpt2 train --config configs/shakespeare.toml --overwrite

# The playground's browser test drives Debian's chromium; installed here when running as root (CI).
browser:
	{ command -v chromium && command -v chromedriver; } >/dev/null || [ "$$(id -u)" != 0 ] || \
		(apt-get update -q && apt-get install -y -q chromium chromium-driver)

test: setup browser
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check .

# The site's own packages (MkDocs, Material, mkdocstrings), once: `pip install -e '.[docs]'`.
$(VENV)/.docs-installed: $(VENV)/.installed pyproject.toml
	$(BIN)/pip install -q -e '.[docs]'
	touch $@

docs: $(VENV)/.docs-installed
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict
