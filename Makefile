# Two commands matter: `make run` and `make test`. Everything they need is installed here.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# The CPU wheel on our build machines; override on a CUDA host, e.g. `make run TORCH_SPEC='torch>=2.13'`.
TORCH_SPEC ?= torch==2.13.0
ARGS ?=

.PHONY: run test lint bench clean install

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $@

install: $(VENV)/.installed

run: $(VENV)/.installed
	$(BIN)/tierflow run digits $(ARGS)

test: $(VENV)/.installed
	$(BIN)/ruff check .
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pytest $(ARGS)

lint: $(VENV)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean:
	rm -rf .tierflow mlflow.db mlruns .pytest_cache

$(VENV)/.bench-installed: pyproject.toml | $(VENV)/.installed
	$(BIN)/python -m pip install --quiet -e ".[bench]"
	touch $@

# The cheap benchmarks (minutes each), written into BENCHMARKS.md. Run by hand, they take longer or need more:
# benchmarks/storage_tiers.py (1 GiB tables, S3 on moto) and benchmarks/serving_load.py (~10 s per load point).
bench: $(VENV)/.installed $(VENV)/.bench-installed
	$(BIN)/python benchmarks/stage_overhead.py --write
	$(BIN)/python benchmarks/cached_rerun.py --with-serve --write
	$(BIN)/python benchmarks/scale.py --write
