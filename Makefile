# distillkit: `make demo` (set up, distil a digits teacher, export, sample) and `make test`.
# Everything installs into .venv/ in the repo root; a second `make` reuses it.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
# torch + torchvision pinned to the pair that imports together on CPU machines and lets
# open_clip run (see README "Installation"); a bare `torch` can pull a multi-GB CUDA build.
TORCH   := torch==2.14.1 torchvision==0.29.1
STAMP   := $(VENV)/.setup-stamp
PYTEST_ARGS ?=

.PHONY: setup demo test lint format bench-quality bench-perf clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e ".[dev,eval,logging]"
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	OMP_WAIT_POLICY=PASSIVE $(BIN)/distillkit demo

test: setup
	$(BIN)/ruff check distillkit tests evaluation
	OMP_WAIT_POLICY=PASSIVE $(BIN)/python -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)

lint: setup
	$(BIN)/ruff check distillkit tests evaluation
	$(BIN)/ruff format --check distillkit tests evaluation

format: setup
	$(BIN)/ruff format distillkit tests evaluation
	$(BIN)/ruff check --fix distillkit tests evaluation

bench-quality: setup
	$(BIN)/python evaluation/bench_quality.py

bench-perf: setup
	$(BIN)/python evaluation/bench_perf.py

clean:
	rm -rf runs .pytest_cache .ruff_cache
