# gluon-ft: every target sets itself up; a fresh clone needs nothing else.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# The setup stamp depends on what defines the install, so editing a pin reinstalls.
SETUP_INPUTS := setup.cfg pyproject.toml requirements/constraints.txt

.PHONY: setup train demo test lint format bench notebooks screenshot docs test-all clean

setup: $(STAMP)

$(STAMP): $(SETUP_INPUTS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade "pip==24.2"
	$(PY) -m pip install --quiet -c requirements/constraints.txt -e ".[serve,notebooks,test]"
	touch $(STAMP)

train: setup
	$(VENV)/bin/gluon-ft train --data hotdog --pretrained imagenet $(ARGS)

demo: setup
	$(VENV)/bin/gluon-ft demo $(ARGS)

lint: setup
	$(VENV)/bin/ruff check gluon_ft tests
	$(VENV)/bin/ruff format --check gluon_ft tests
	$(VENV)/bin/lint-imports

format: setup
	$(VENV)/bin/ruff format gluon_ft tests
	$(VENV)/bin/ruff check --fix gluon_ft tests

# make test leaves out the tests marked slow (the 8-minute budget on 2 cores); .ci/run runs
# them after it with make test-slow, and make test-all runs everything.
test: setup lint
	$(VENV)/bin/python -m pytest -q -m "not slow" $(ARGS)

test-slow: setup
	$(VENV)/bin/python -m pytest -q -m slow $(ARGS)

# make test grafts one model per family; this grafts every name `gluon-ft models` lists, and
# runs the two-host test in network namespaces (tests/test_multihost.py, root only).
test-all: setup lint
	GLUON_FT_ALL_MODELS=1 $(VENV)/bin/python -m pytest -q $(ARGS)

# Executes notebooks/*.ipynb in place, outputs included, with a kernel of .venv's Python.
# GLUON_FT_NOTEBOOK_MODE=full (default: the book's data and ImageNet weights, else a fallback
# the notebooks explain) or smoke. Commit them stripped (what make test checks):
# .venv/bin/python -m gluon_ft.notebook strip notebooks/*.ipynb
notebooks: setup
	$(PY) -m gluon_ft.notebook run notebooks/*.ipynb

bench: setup
	$(VENV)/bin/gluon-ft bench $(ARGS)

# docs/screenshot.png for the README: trains a small run (real hot-dog photos when ../shared is
# there), serves it and drives headless Chromium with the page test's code (tests/test_serve.py).
screenshot: setup
	$(PY) tests/test_serve.py --screenshot docs/screenshot.png

# docs/cli.md: every command's usage and flags with their defaults, written from the parser
# (tests/test_cli.py fails when it is not current).
docs: setup
	$(PY) -m gluon_ft.cli.docs docs/cli.md

clean:
	rm -rf $(VENV) runs build dist *.egg-info .pytest_cache .ruff_cache
