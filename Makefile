# `make repro` builds the pipeline's artifacts; `make test` runs the test suite.
# Both create .venv on first use and install the project into it.
VENV ?= .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed
PYTHON ?= python3

.PHONY: repro test test-fast install clean

install: $(INSTALLED)

$(INSTALLED): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	@# Where this machine's pip finds a local CPU build of torch (its find-links), take it:
	@# a plain `torch` requirement would otherwise pull a multi-GB CUDA build. Elsewhere
	@# this step finds nothing and the normal torch from pyproject.toml is installed.
	-$(BIN)/python -m pip install --quiet --no-index --no-deps torch==2.13.0 2>/dev/null
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(INSTALLED)

repro: $(INSTALLED)
	PATH="$(abspath $(BIN)):$$PATH" dvc repro

test: $(INSTALLED)
	PATH="$(abspath $(BIN)):$$PATH" python -m pytest

# The edit-test loop: everything but the end-to-end runs on real models (under a minute).
test-fast: $(INSTALLED)
	PATH="$(abspath $(BIN)):$$PATH" python -m pytest -m "not slow" -q

clean:
	rm -rf $(VENV)
