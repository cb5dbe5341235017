# Fresh machine: `make demo` or `make test`. Both create .venv and install what they need.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv deps demo test test-fast lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

deps:
	./scripts/install-test-deps.sh

demo: venv
	$(BIN)/bastion demo

lint: venv
	$(BIN)/ruff check gateway tests bench
	$(BIN)/ruff format --check gateway tests bench
	$(BIN)/mypy

test: venv deps lint
	$(BIN)/pytest -q -p no:cacheprovider

test-fast: venv
	$(BIN)/pytest -q -x tests/unit

# Every benchmark in bench/, one after the other (each prints its own ratios against its baseline), then one table.
bench: venv deps
	@$(BIN)/python bench/summary.py --load-start
	@set -e; for b in bench/*.py; do [ "$$b" = bench/summary.py ] && continue; echo "== $$b"; $(BIN)/python $$b; done
	@$(BIN)/python bench/summary.py --load-end
	@$(BIN)/python bench/summary.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
