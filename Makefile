# RL-MedBook: `make book` builds the book, `make test` runs the tests. Both set everything up.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PROFILE ?= quick
# Data root: $RLMED_DATA if set, else the shared folder beside the repository when present.
RLMED_DATA ?= $(if $(wildcard ../shared/data/medmnist/*.npz),$(abspath ../shared/data/medmnist),$(HOME)/.medmnist)
export RLMED_DATA
export NO_ALBUMENTATIONS_UPDATE := 1

.PHONY: setup book book-all test test-fast browser lab clean-book

$(VENV)/.installed: requirements.txt pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $@

setup: $(VENV)/.installed

# Headless Chromium for the browser test (Debian package; needs root, as on CI).
browser:
	@command -v chromium >/dev/null || { apt-get update -qq && apt-get install -y -qq chromium >/dev/null; } \
	  || echo "warning: could not install chromium; the browser test will be skipped"

book: setup
	$(PY) -m helpers.book --profile $(PROFILE)

# Also the long runs marked on_demand in book/_runs.yml (hours on a 2-core CPU).
book-all: setup
	$(PY) -m helpers.book --profile $(PROFILE) --on-demand

test: setup browser
	$(PY) -m pytest -q -p no:cacheprovider

test-fast: setup
	$(PY) -m pytest -q -p no:cacheprovider -m "not slow"

lab: setup
	$(VENV)/bin/jupyter lab notebooks/

clean-book:
	rm -rf book/_build book/runs book/results
