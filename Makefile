# edgetune: the two set-up commands.
#   make quickstart   fine-tune -> merge -> export int4 -> run, on the shipped tiny model
#   make test         the test suite
#   make lint         ruff (lint + format check), mypy, docs/benchmarks.md up to date (CI runs it first)
# Each creates .venv if missing and installs everything through pyproject.toml/setup.py.
# TORCH picks the torch build: the default is the CPU build (installed from local disk on
# edgetune's CI machines). A CUDA user passes e.g.
#   make quickstart TORCH="torch --index-url https://download.pytorch.org/whl/cu124"

PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.edgetune-installed

.PHONY: quickstart test lint clean

$(STAMP): pyproject.toml setup.py kernels/csrc/*.c kernels/csrc/*.h kernels/_ckernels.pyx
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	CMAKE_ARGS="-DGGML_NATIVE=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TESTS=OFF" \
		$(BIN)/python -m pip install -q -e ".[train,export,distributed,serve,dev]"
	touch $(STAMP)

quickstart: $(STAMP)
	$(BIN)/edgetune quickstart --force

test: $(STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/python tools/benchmarks_md.py --check

clean:
	rm -rf build *.egg-info kernels/_ckernels.c kernels/*.so edgetune-quickstart
