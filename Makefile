# RL-MedBook: `make book` builds the book, `make test` runs the tests. Both set everything up.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PROFILE ?= quick
# The data root is resolved in one place, helpers.config.data_root() ($RLMED_DATA, else its default).
export NO_ALBUMENTATIONS_UPDATE := 1
# JupyterLab refuses to start as root without --allow-root (containers, CI).
LAB_FLAGS := $(if $(filter 0,$(shell id -u)),--allow-root,)

.PHONY: setup book book-all publish stash test test-fast browser lab clean-book

$(VENV)/.installed: requirements.txt pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $@

# nbstripout as git's clean filter for the templates (notebooks/**, see .gitattributes): a Run All
# in JupyterLab autosaves outputs into them, and git stores them without. Published pages keep theirs.
setup: $(VENV)/.installed
	@if git rev-parse --git-dir >/dev/null 2>&1; then \
	  git config filter.nbstripout.clean "'$(abspath $(VENV))/bin/python' -m nbstripout --keep-id" && \
	  git config filter.nbstripout.smudge cat && \
	  git config diff.ipynb.textconv "'$(abspath $(VENV))/bin/python' -m nbstripout --keep-id -t"; fi

# Headless Chromium for the browser test (Debian package; needs root, as on CI).
browser:
	@command -v chromium >/dev/null || { apt-get update -qq && apt-get install -y -qq chromium >/dev/null; } \
	  || echo "warning: could not install chromium; the browser test will be skipped"

book: setup
	$(PY) -m helpers.book --profile $(PROFILE)

# Also the long runs marked on_demand in book/_runs.yml (their measured cost is written there).
book-all: setup
	$(PY) -m helpers.book --profile $(PROFILE) --on-demand

# Copy a finished run to book/published/ (tracked), e.g. make publish RUN=nas_reference
publish: setup
	$(PY) -m helpers.book --publish $(RUN)

# Copy an unfinished run's units (no weights) to book/partial/ (tracked) to resume it elsewhere
stash: setup
	$(PY) -m helpers.book --stash $(RUN)

test: setup browser
	$(PY) -m pytest -q -p no:cacheprovider

test-fast: setup
	$(PY) -m pytest -q -p no:cacheprovider -m "not slow"

lab: setup
	$(VENV)/bin/jupyter lab $(LAB_FLAGS) notebooks/

# Also the book's training checkpoints (in $$RLMED_CACHE): a build after clean-book starts from nothing.
clean-book:
	rm -rf book/_build book/runs book/results
	@! test -x $(PY) || $(PY) -c "import shutil; from helpers.config import book_dir; from helpers.experiment import checkpoint_dir; \
	  d = checkpoint_dir(book_dir() / 'results'); shutil.rmtree(d, ignore_errors=True); print('rm -rf', d)"
