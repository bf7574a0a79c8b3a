# One command for a fresh machine: `make test` sets up .venv (scripts/setup_env.sh) and runs the tests.
VENV ?= .venv
PY := $(VENV)/bin/python
# Use the project's shared offline data folder when it exists (and the user has not chosen one).
ifneq ($(wildcard ../shared/data),)
export MOE_APPS_DATA ?= $(abspath ../shared/data)
endif

.PHONY: setup test lint train clean
setup:
	bash scripts/setup_env.sh

test: setup
	$(PY) -m pytest -q -n 2 --timeout=900

lint: setup
	$(VENV)/bin/ruff check moe_core moe_apps tests benchmarks examples

train: setup
	$(VENV)/bin/moe-apps data download movielens-100k
	$(VENV)/bin/moe-apps recsys train

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
