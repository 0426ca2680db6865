# Two commands on a fresh clone: `make book` and `make test` (each sets everything up).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
export OMP_NUM_THREADS := 1
# The book's arithmetic (bnlib/repro.py): with BNLIB_ARITHMETIC=pinned, importing bnlib
# puts MKL, ATen, oneDNN, OpenBLAS and NumPy on one AVX2 code path, the same on every
# x86-64 CPU (Intel or AMD); `native` leaves each on the CPU's own. Tests and chapters
# run pinned; `make claims` and the benchmark run native.
PINNED := BNLIB_ARITHMETIC=pinned
NATIVE := BNLIB_ARITHMETIC=native

.PHONY: help setup book test lint pytest nbval claims check-book execute bench clean \
        freeze binder-check

help:
	@echo "make book   - set up .venv and build the HTML book into _build/html"
	@echo "make test   - set up .venv and run every check: lint, pytest, nbval, the"
	@echo "              chapters on native arithmetic, the book build (zero"
	@echo "              warnings) and the offline browser test"
	@echo "make claims - run every chapter on this CPU's own arithmetic; fail if an"
	@echo "              assert does (BNBOOK_OUTPUTS=claims make test: no nbval)"
	@echo "make execute - re-run every chapter in place and print each one's time"
	@echo "make bench  - run the speed benchmark (python -m bnlib.bench)"
	@echo "make binder-check - build a fresh env from binder/ as Binder does and run"
	@echo "              a chapter in it (minutes; not part of make test)"
	@echo "make clean  - remove _build (keep .venv)"

$(STAMP): requirements.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -r requirements.txt
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps -e .
	touch $(STAMP)

setup: $(STAMP)

# MathJax 3 is served from the book's own files (from the sphinx-mathjax-offline package
# on PyPI), so that the HTML book typesets math with no network. SVG output needs no
# font files, so it works from file:// too.
MATHJAX := _vendor/mathjax/tex-svg.js
$(MATHJAX): $(STAMP)
	rm -rf _vendor/mathjax
	$(BIN)/python -c "from importlib.metadata import distribution as d; import shutil; \
	src = d('sphinx-mathjax-offline').locate_file('sphinx-mathjax-offline/static/mathjax'); \
	shutil.copytree(src, '_vendor/mathjax', ignore=shutil.ignore_patterns('*.woff'))"

book: $(STAMP) $(MATHJAX)
	$(BIN)/jupyter-book build -W -n --keep-going .
	@echo "The book is in _build/html/index.html"

lint: $(STAMP)
	$(BIN)/ruff check bnlib tests scripts

pytest: $(STAMP)
	$(PINNED) $(BIN)/python -m pytest --ignore=tests/test_book_browser.py

# nbval re-executes every chapter and compares each output with the stored one, where
# this machine can compute the book's bits (scripts/check_arithmetic.py decides, from a
# fingerprint; elsewhere it says why in one line and `claims` checks every chapter).
nbval: $(STAMP)
	@mode=$$($(BIN)/python scripts/check_arithmetic.py) || exit 1; \
	if [ "$$mode" = compare ]; then \
	    $(PINNED) $(BIN)/python -m pytest -p no:cacheprovider --nbval \
	        --nbval-sanitize-with book/nbval-sanitize.cfg book/; \
	else echo "nbval: skipped (outputs not compared); make claims runs every chapter"; fi

# Every chapter on this CPU's own arithmetic: each asserted claim must hold there too.
claims: $(STAMP)
	$(NATIVE) $(BIN)/python scripts/execute_notebooks.py --check

# The built book: every page in headless Chromium with the network off.
check-book: book
	$(BIN)/python -m pytest tests/test_book_browser.py

# The four long checks are independent and single-threaded (one BLAS/OpenMP thread
# each): two at a time, they take about half the wall time on 2 cores. Each one's
# output is printed whole when it ends (--output-sync).
test: lint
	$(MAKE) --no-print-directory -j2 --output-sync=target pytest nbval claims book
	$(BIN)/python -m pytest tests/test_book_browser.py

# Re-run every chapter in place (after changing bnlib or a chapter), timing each.
execute: $(STAMP)
	$(PINNED) $(BIN)/python scripts/execute_notebooks.py

bench: $(STAMP)
	$(NATIVE) $(BIN)/python -m bnlib.bench

# Binder's launch button: a fresh venv built from binder/ the way repo2docker does
# (requirements.txt, then postBuild), then a chapter run in it. Takes minutes. Pass
# other chapters with CHAPTERS="book/02_formulation.ipynb ...".
binder-check: $(STAMP)
	$(BIN)/python scripts/binder_requirements.py
	$(BIN)/python scripts/check_binder.py $(CHAPTERS)

clean:
	rm -rf _build _vendor

freeze: $(STAMP)
	{ grep '^#' requirements.txt; $(BIN)/python -m pip freeze --exclude-editable \
	  | sed 's/+cpu$$//'; } > requirements.new && mv requirements.new requirements.txt

# The course kit (course/, issue 17): `make course` builds the student notebooks and the
# Otter autograders into _build/course/; `make grade NB=submission.ipynb` grades one
# submission offline (no container, no network), last line `score: X / Y`. The kit's
# check (tests/test_course.py) runs in `make pytest`, so in `make test`; `make
# course-check` runs it alone.
.PHONY: course grade course-check
COURSE_STAMP := _build/course/.built
$(COURSE_STAMP): $(STAMP) scripts/course.py $(wildcard course/*.ipynb course/*.py course/wrong/*.py)
	$(BIN)/python scripts/course.py build
	touch $@

course: $(COURSE_STAMP)

grade: $(COURSE_STAMP)
	@test -n "$(NB)" || { echo "usage: make grade NB=path/to/submission.ipynb"; exit 2; }
	@$(BIN)/python scripts/course.py grade "$(NB)"

course-check: $(STAMP)
	$(BIN)/python -m pytest -p no:cacheprovider tests/test_course.py
