# make repro: install into .venv and run the whole pipeline (dvc repro).
# make test:  install into .venv (with test tools) and run the tests.
VENV ?= .venv
PYTHON ?= $(shell command -v python3)  # resolved before the venv goes first on PATH
BIN := $(abspath $(VENV))/bin
# DVC runs each stage's `python -m pipeline ...` with the python first on PATH: the venv's, even from a
# shell where it is not activated.
export PATH := $(BIN):$(PATH)

.PHONY: repro test test-fast seeds results install bench clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $@

install: $(BIN)/.installed

repro: install
	$(BIN)/dvc repro

test: install
	$(BIN)/python -m pytest

# Everything but the end-to-end modules (DVC, MLflow server and projects, torchrun): the inner loop.
test-fast: install
	$(BIN)/python -m pytest --ignore=tests/test_dvc_pipeline.py --ignore=tests/test_dvc_remote.py \
		--ignore=tests/test_tracking_server.py --ignore=tests/test_mlproject.py --ignore=tests/test_distributed.py

# Seeds 1 and 2 of the ResNet beside the pipeline's seed 0 -> metrics/seeds.json; then the results document.
seeds: install
	$(BIN)/python -m pipeline seeds --seeds 0 1 2

results: install
	$(BIN)/python -m pipeline.results

bench: install
	$(BIN)/python bench/train_speed.py
