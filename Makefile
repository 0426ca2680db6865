# Two commands on a fresh clone: `make book` and `make test` (each sets everything up).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
export OMP_NUM_THREADS := 1

.PHONY: help setup book test lint pytest bench clean freeze

help:
	@echo "make book   - set up .venv and build the HTML book into _build/html"
	@echo "make test   - set up .venv and run every check (lint, pytest)"
	@echo "make bench  - run the speed benchmark (python -m bnlib.bench)"
	@echo "make clean  - remove _build (keep .venv)"

$(STAMP): requirements.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -r requirements.txt
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps -e .
	touch $(STAMP)

setup: $(STAMP)

book: $(STAMP)
	$(BIN)/jupyter-book build -W -n --keep-going .
	@echo "The book is in _build/html/index.html"

lint: $(STAMP)
	$(BIN)/ruff check bnlib tests

pytest: $(STAMP)
	$(BIN)/python -m pytest

test: lint pytest

bench: $(STAMP)
	$(BIN)/python -m bnlib.bench

clean:
	rm -rf _build

freeze: $(STAMP)
	$(BIN)/python -m pip freeze --exclude-editable | sed 's/+cpu$$//' > requirements.txt
