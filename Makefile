# The two commands a new user needs: `make demo` and `make test`.
# Each creates .venv and installs genseg into it when needed (a no-op when up to date).
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

export RAY_AUTH_MODE ?= disabled
export RAY_USAGE_STATS_ENABLED ?= 0
export RAY_ENABLE_UV_RUN_RUNTIME_ENV ?= 0

.PHONY: install demo test test-unit test-integration bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	PYTHONWARNINGS=ignore $(BIN)/python -m pip install --quiet -e '.[test]'   # no build-backend advice for users
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/genseg demo

test: $(STAMP)
	$(BIN)/python -m pytest tests

test-unit: $(STAMP)
	$(BIN)/python -m pytest tests -m unit

test-integration: $(STAMP)
	$(BIN)/python -m pytest tests -m integration

clean:
	rm -rf genseg-runs .pytest_cache
