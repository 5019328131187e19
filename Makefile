# meerkat-edge: `make demo` runs broker + coordinator + clients on a tiny offline model; `make test` runs the suite.
# Both create/reuse .venv. On a CUDA / Jetson machine install your platform's torch into .venv first
# (python3 -m venv .venv && .venv/bin/pip install <your torch wheel>): make only installs the CPU
# torch below when no torch is importable in .venv.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
DEMO_ARGS ?=
TEST_ARGS ?=

.PHONY: demo test lint typecheck bench clean-venv

$(VENV)/.installed: pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -m pip install -q --upgrade pip
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	@$(PY) -m pip install -q -e ".[dev]"
	@touch $@

demo: $(VENV)/.installed
	$(VENV)/bin/meerkat demo $(DEMO_ARGS)

test: $(VENV)/.installed
	$(PY) -m pytest -q $(TEST_ARGS)

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check shared edge_client coordinator bench tests

# mypy's settings are in pyproject.toml [tool.mypy]: --strict on shared, edge_client, coordinator and bench;
# tests/ with three of strict's flags relaxed
typecheck: $(VENV)/.installed
	$(VENV)/bin/mypy

bench: $(VENV)/.installed
	$(VENV)/bin/meerkat bench wire --json
	$(VENV)/bin/meerkat bench prng --json
	$(VENV)/bin/meerkat bench step --json

clean-venv:
	rm -rf $(VENV)
