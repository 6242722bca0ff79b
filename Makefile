# The two commands of the README: `make book` (run the demo study and build the book) and `make test`.
# Both create .venv when it is missing and reinstall when pyproject.toml changes.

PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
PROFILE ?= demo
PYTEST_ARGS ?=
HTML   ?= _build/html
REMOTE ?= origin

.PHONY: book publish test test-paper test-random vendor mutation venv system-deps clean-book clean-artifacts benchmark help

help:
	@echo "make book          run the '$(PROFILE)' profile's notebooks with papermill and build the book (HTML under _build/html)"
	@echo "make publish       put the built book (_build/html) on the gh-pages branch and push it to $(REMOTE)"
	@echo "make test          ruff check, then the whole test suite"
	@echo "make system-deps   install the Debian packages the browser tests and the book need (chromium, npm; needs root)"
	@echo "make benchmark     print the benchmark table (benchmarks/run.py)"

$(BIN)/python:
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "error: $(PYTHON) not found; install Python 3.11 or run 'make PYTHON=/path/to/python3.11 ...'"; exit 1; }
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet --upgrade pip setuptools wheel
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

book: $(STAMP)
	$(BIN)/stego-study book --profile $(PROFILE)

publish: $(STAMP)
	$(BIN)/stego-study publish --html $(HTML) --remote $(REMOTE)

test: $(STAMP) vendor
	$(BIN)/ruff check stego_core notebooks tests benchmarks
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The book's JavaScript, fetched from the npm registry once (the tests never fetch: STEGO_VENDOR_OFFLINE).
vendor: $(STAMP)
	$(BIN)/stego-study vendor

# The synthetic preflight of every paper and newer-backbone profile (about an hour on a 2-core CPU).
test-paper: $(STAMP) vendor
	STEGO_PREFLIGHT_ALL=1 $(BIN)/python -m pytest tests/test_preflight.py -k synthetic_preflight $(PYTEST_ARGS)

# The fast suite in two random orders (pytest-randomly; rerun one with `-p randomly --randomly-seed=N`).
test-random: $(STAMP) vendor
	$(BIN)/python -m pytest -m "not slow" -p randomly --randomly-seed=1 $(PYTEST_ARGS)
	$(BIN)/python -m pytest -m "not slow" -p randomly --randomly-seed=2 $(PYTEST_ARGS)

# Mutation testing ([tool.mutmut] in pyproject.toml: the modules that decide the numbers against their fast tests;
# about half an hour on 2 cores); prints the score. Survivors and why: benchmarks/mutation.md.
mutation: $(STAMP)
	rm -rf mutants
	HF_HUB_OFFLINE=1 $(BIN)/mutmut run --max-children $$(nproc) > mutants.log 2>&1 || { tail -c 2000 mutants.log; exit 1; }
	$(BIN)/python benchmarks/mutation_score.py

benchmark: $(STAMP)
	$(BIN)/python benchmarks/run.py

system-deps:
	apt-get update -qq
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core
	command -v npm >/dev/null 2>&1 || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends npm

clean-book:
	rm -rf _build book/chapters

clean-artifacts:
	rm -rf artifacts
