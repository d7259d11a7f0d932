# Each target sets up .venv by itself (editable install of this project), then runs.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.gfgp-installed
PYTEST := $(PY) -m pytest

.PHONY: demo test test-zoo test-slow test-all lint clean

# One venv for every target: the test and lint extras are installed together.
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[test,lint]'
	touch $(STAMP)

demo: $(STAMP)
	./scripts/demo.sh $(VENV)

test: $(STAMP)
	$(PYTEST) -q -m "not zoo and not slow and not gpu"

test-zoo: $(STAMP)
	$(PYTEST) -q -m zoo -s

test-slow: $(STAMP)
	$(PYTEST) -q -m "slow and not gpu"

test-all: $(STAMP)
	$(PYTEST) -q -m "not gpu"

# ruff: the whole code base; mypy: the graph passes, the op and the spec (the typed core).
lint: $(STAMP)
	$(VENV)/bin/ruff check gfgp_cli graph_passes tests scripts
	$(VENV)/bin/mypy graph_passes gfgp_cli/ops gfgp_cli/spec.py gfgp_cli/choices.py

clean:
	rm -rf $(VENV) demo-out .pytest_cache .hypothesis
