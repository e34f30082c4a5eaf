# `make demo` and `make test` each create .venv if missing and install what they need (once).
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test lint clean-runs

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Reinstalls only when pyproject.toml changes; a second run installs nothing. The dense extra (OpenMMLab) runs
# the ADE20K / COCO evaluations.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet --upgrade "pip>=24" "setuptools>=68,<81"
	$(BIN)/python -m pip install --quiet -e ".[dev,dense]"
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/repro data tiny --out data/tiny
	$(BIN)/repro launch configs/demo.yaml --executor local
	$(BIN)/repro report configs/demo.yaml

lint: install
	$(BIN)/ruff check .

# One process: two pytest-xdist workers (-n 2, a test file each) were no faster on a 2-core machine like CI's: every
# CPU-bound test ran about 2x slower beside the other (the learning tests: 102-233 s each, vs 55-125 s alone).
# OMP_WAIT_POLICY=PASSIVE: the learning tests' pre-trainings run in the background beside the other tests
# (tests/conftest.py), and OpenMP threads that spin while waiting for a core another process holds waste it
# (one run each: 1011 vs 1117 s of pytest, within this host's run-to-run spread of ~15 %).
test: lint
	OMP_WAIT_POLICY=PASSIVE $(BIN)/python -m pytest -q -ra --durations=15

clean-runs:
	rm -rf runs data/tiny
