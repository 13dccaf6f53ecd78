# Quick start: `make run` (the workflow, locally) and `make test` (the test suite).
# Both build .venv first when it is missing or older than the pinned requirements.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
SNAKEMAKE := $(BIN)/snakemake
# Rules run `python -m mnistflow...`: the venv's python must come first on their PATH.
export PATH := $(CURDIR)/$(BIN):$(PATH)

.PHONY: install install-system run demo report test bench lint format clean

install: $(STAMP)

# The pinned requirements, then mnistflow itself, editable: importable from src/ without
# PYTHONPATH (the rules still put src/ first on PYTHONPATH, for conda envs and modules).
$(STAMP): requirements.txt constraints.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -r requirements.txt -c constraints.txt
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps -e .
	touch $(STAMP)

# Debian packages the tests use: a real Slurm (started by tests/cluster), the real
# Fashion-MNIST files, and Lmod (a real module system for --sdm env-modules).
install-system:
	tests/cluster/install-packages.sh

run: install
	$(SNAKEMAKE) --workflow-profile profiles/local
	$(SNAKEMAKE) --workflow-profile profiles/local --report results/report.html

# The whole chain offline on 10,000 real MNIST digits served from a loopback mirror.
demo: install
	$(BIN)/python -m mnistflow.demo

# Two workers: the Slurm tests, which mostly wait on Slurm, on one; the rest beside them
# (tests/xdist_units.py). `.venv/bin/python -m pytest` alone runs them one after another.
test: install
	$(BIN)/python -m pytest -n 2

bench: install
	$(BIN)/python bench/run_all.py

lint: install
	$(SNAKEMAKE) --lint
	$(BIN)/snakefmt --check Snakefile workflow/rules

format: install
	$(BIN)/snakefmt Snakefile workflow/rules

clean:
	rm -rf results .snakemake
