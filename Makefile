# The two commands of the README: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
ARGS ?=

.PHONY: demo test lint typecheck docs format bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.demo-installed: setup.cfg pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e '.[demo]'
	touch $@

$(VENV)/.test-installed: setup.cfg pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e '.[test,flax,colabs,docs]'
	touch $@

demo: $(VENV)/.demo-installed
	$(BIN)/python -m optaxderived.demo $(ARGS)

lint: $(VENV)/.test-installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(VENV)/.test-installed
	$(BIN)/mypy optaxderived

# The docs site, notebooks executed (warnings are errors); open docs/_build/html/index.html.
docs: $(VENV)/.test-installed
	$(BIN)/sphinx-build -W --keep-going -q -b html docs docs/_build/html

test: lint typecheck docs
	$(BIN)/python -m pytest -n auto

format: $(VENV)/.test-installed
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

bench: $(VENV)/.test-installed
	$(BIN)/python -m benchmarks $(ARGS)

clean:
	rm -rf $(VENV) demo-output .pytest_cache .ruff_cache .mypy_cache docs/_build
