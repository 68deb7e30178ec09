# Two commands: `make quickstart` and `make test`. Both set everything up first (idempotent).
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup quickstart test lint bench

setup:
	bash scripts/setup.sh

quickstart: setup
	$(PY) -m sparsedict quickstart

test: setup
	$(PY) -m ruff check .
	$(PY) -m pytest -q -p no:cacheprovider; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: treating as failure" >&2; exit 1; fi; exit $$rc

lint: setup
	$(PY) -m ruff check . && $(PY) -m ruff format --check .

bench: setup
	$(PY) benchmarks/throughput.py
