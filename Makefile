# make repro: install into .venv and run the whole pipeline (dvc repro).
# make test:  install into .venv (with test tools) and run the tests.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin

.PHONY: repro test install bench clean

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

bench: install
	$(BIN)/python bench/train_speed.py
