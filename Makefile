# The README's two commands for a fresh machine: `make train` and `make test`; both first set up .venv
# (scripts/setup_env.sh, idempotent). `make lint` runs ruff over the tree.
VENV ?= .venv
# Use the project's shared offline data folder when it exists (and the user has not chosen one).
ifneq ($(wildcard ../shared/data),)
export MOE_APPS_DATA ?= $(abspath ../shared/data)
endif

.PHONY: setup train test lint
setup:
	VENV=$(VENV) bash scripts/setup_env.sh

train: setup
	$(VENV)/bin/moe-apps data download movielens-100k
	$(VENV)/bin/moe-apps recsys train

test: setup
	$(VENV)/bin/python -m pytest -q -n 2 --timeout=900

lint: setup
	$(VENV)/bin/ruff check .
