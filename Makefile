# Two commands set everything up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Where fetched models and data are cached (outside git). Override with SPARSEFORGE_CACHE=...
export SPARSEFORGE_CACHE ?= $(HOME)/.cache/sparseforge
DEMO_OUT ?= runs/demo

.PHONY: demo test test-fast env clean

env: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# The CPU build of torch lies on this machine's disk; an unpinned torch pulls a multi-GB CUDA build.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[test,online]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/sparseforge run recipes/demo.yaml --out $(DEMO_OUT) --overwrite

test: $(STAMP)
	$(PY) -m pytest -q

test-fast: $(STAMP)
	$(PY) -m pytest -q -m 'not integration'

clean:
	rm -rf $(VENV) runs
