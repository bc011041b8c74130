# The two set-up commands of the README: `make demo` and `make test`.
# Both create .venv with everything the project needs; nothing has to be installed by hand.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint install browser clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/pubsub-canary demo $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check pubsub_canary tests benchmarks examples
	$(BIN)/ruff format --check pubsub_canary tests benchmarks examples
	$(BIN)/mypy

# The status page's browser test drives Debian's chromium (never a downloaded browser).
browser:
	bash scripts/install-browser.sh

test: lint browser
	$(BIN)/python -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
