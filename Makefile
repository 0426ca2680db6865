# Two commands on a fresh clone: `make book` and `make test` (each sets everything up).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
export OMP_NUM_THREADS := 1

.PHONY: help setup book test lint pytest check-book bench clean freeze

help:
	@echo "make book   - set up .venv and build the HTML book into _build/html"
	@echo "make test   - set up .venv and run every check (lint, pytest)"
	@echo "make check-book - build the book and open every page in headless Chromium"
	@echo "make bench  - run the speed benchmark (python -m bnlib.bench)"
	@echo "make clean  - remove _build (keep .venv)"

$(STAMP): requirements.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -r requirements.txt
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps -e .
	touch $(STAMP)

setup: $(STAMP)

# MathJax is served from the book's own files (from the jupyter-server-mathjax package on
# PyPI), so that the HTML book typesets math with no network.
MATHJAX := _vendor/mathjax/MathJax.js
$(MATHJAX): $(STAMP)
	$(BIN)/python -c "import jupyter_server_mathjax as m, pathlib, shutil; \
	shutil.copytree(pathlib.Path(m.__file__).parent / 'static', '_vendor/mathjax', \
	dirs_exist_ok=True)"

book: $(STAMP) $(MATHJAX)
	$(BIN)/jupyter-book build -W -n --keep-going .
	@echo "The book is in _build/html/index.html"

lint: $(STAMP)
	$(BIN)/ruff check bnlib tests

pytest: $(STAMP)
	$(BIN)/python -m pytest --ignore=tests/test_book_browser.py

# The book's own checks (a zero-warning build, every page in headless Chromium with the
# network off). They join `make test` together with the chapters (nbval) in Part I.
check-book: book
	$(BIN)/python -m pytest tests/test_book_browser.py

test: lint pytest

bench: $(STAMP)
	$(BIN)/python -m bnlib.bench

clean:
	rm -rf _build _vendor

freeze: $(STAMP)
	{ grep '^#' requirements.txt; $(BIN)/python -m pip freeze --exclude-editable \
	  | sed 's/+cpu$$//'; } > requirements.new && mv requirements.new requirements.txt
