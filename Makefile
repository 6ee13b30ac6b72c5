# Two commands do all set-up on a fresh Debian machine with Python 3.11:
#   make demo   creates .venv, installs, and runs the main job on the embedded default
#               (make demo INPUT="a.jsonl b.parquet" RUN_DIR=runs/mine: the same on your own text)
#   make test   creates .venv if needed, installs (plus SLURM for the cluster tests), runs the tests
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test install lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# Reinstall when the dependency list changes.
$(STAMP): setup.py | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

install: $(STAMP)

demo: install
	PATH=$(CURDIR)/$(BIN):$$PATH bash scripts/demo.sh $(foreach f,$(INPUT),--input $(f)) $(if $(RUN_DIR),--run-dir $(RUN_DIR))

test: install
	bash scripts/slurm_cluster.sh install
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/python -m pytest -q $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) artifacts runs
