# The two commands a new user needs: `make demo` and `make test`.
# Each creates .venv and installs genseg into it when needed (a no-op when up to date).
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

export RAY_AUTH_MODE ?= disabled
export RAY_USAGE_STATS_ENABLED ?= 0
export RAY_ENABLE_UV_RUN_RUNTIME_ENV ?= 0

.PHONY: install demo test test-unit test-integration bench clean chromium

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	PYTHONWARNINGS=ignore $(BIN)/python -m pip install --quiet -e '.[test]'   # no build-backend advice for users
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/genseg demo

test: $(STAMP) chromium
	$(BIN)/python -m pytest tests --durations=20

# The web page's test drives Debian's headless Chromium (no browser download at test time).
chromium:
	@command -v chromium >/dev/null 2>&1 || { echo "installing Debian's chromium for the web page test"; \
	  apt-get install -y -q chromium >/dev/null 2>&1 || { apt-get update -q >/dev/null 2>&1 && \
	  apt-get install -y -q chromium >/dev/null 2>&1; } || \
	  echo "could not install chromium (not root?): the browser test will be skipped"; }

test-unit: $(STAMP)
	$(BIN)/python -m pytest tests -m unit

test-integration: $(STAMP)
	$(BIN)/python -m pytest tests -m integration

clean:
	rm -rf genseg-runs .pytest_cache
