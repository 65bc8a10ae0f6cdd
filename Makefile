# distillkit: `make demo` (set up, distil a digits teacher, export, sample) and `make test`.
# Everything installs into .venv/ in the repo root; a second `make` reuses it.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
# torch + torchvision pinned to the pair that imports together on CPU machines and lets
# open_clip run (see README "Installation"); a bare `torch` can pull a multi-GB CUDA build.
TORCH   := torch==2.14.1 torchvision==0.29.1
STAMP   := $(VENV)/.setup-stamp
# pytest runs in two worker processes (pytest-xdist); PYTEST_ARGS="-n 0 tests/unit": one
PYTEST_ARGS ?=

.PHONY: setup demo test lint format bench-quality bench-lora bench-perf bench-realsize soak gpu-wheels gpu-check clean

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
	OMP_WAIT_POLICY=PASSIVE $(BIN)/python -m pytest -q -p no:cacheprovider -n 2 --dist loadfile $(PYTEST_ARGS)

lint: setup
	$(BIN)/ruff check distillkit tests evaluation
	$(BIN)/ruff format --check distillkit tests evaluation

format: setup
	$(BIN)/ruff format distillkit tests evaluation
	$(BIN)/ruff check --fix distillkit tests evaluation

bench-quality: setup
	$(BIN)/python evaluation/bench_quality.py

bench-lora: setup
	$(BIN)/python evaluation/bench_lora.py $(LORA_ARGS)

bench-perf: setup
	$(BIN)/python evaluation/bench_perf.py

# A long tiny-teacher run watched for memory creep, checkpoint rotation and log growth (not part
# of `make test`); SOAK_ARGS="--steps 500" for a shorter one.
SOAK_ARGS ?=
soak: setup
	OMP_WAIT_POLICY=PASSIVE $(BIN)/python evaluation/soak.py $(SOAK_ARGS)

# Real-size random-weight teachers through the CLI on this CPU (not part of `make test`). Peak
# RSS (export): SD1.5 9.5 GiB, ~13 min on 2 cores; SDXL ~20 GiB (DMD2) / ~27 GiB (LCM-LoRA);
# SANA ~21 / ~25 GiB: an export that would not fit is skipped unless --force (README).
# REALSIZE_ARGS="--families sdxl" measures one family and merges it into realsize.json.
REALSIZE_ARGS ?=
bench-realsize: setup
	OMP_WAIT_POLICY=PASSIVE $(BIN)/python evaluation/bench_realsize.py $(REALSIZE_ARGS)

# The GPU machine has no venv, diffusers or pydantic: they travel as wheels in .whl/
# (docs/gpu-check.md). gpu-wheels downloads them here; gpu-check runs there with python3.
GPU_WHEELS := diffusers==0.42.1 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 \
	typing-inspection==0.4.5 typing-extensions==4.16.0
GPU_PLATFORMS := --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
	--platform manylinux2014_x86_64
gpu-wheels:
	mkdir -p .whl
	for w in $(GPU_WHEELS); do \
	  $(PY) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
	    --implementation cp $(GPU_PLATFORMS) -d .whl $$w || exit 1; done
	ex="$$(git rev-parse --git-common-dir)/info/exclude"; grep -qxF '/.whl/' "$$ex" || echo '/.whl/' >> "$$ex"
	du -sh .whl

GPU_CHECK_ARGS ?=
gpu-check:
	PYTHONPATH=/tmp/site:$(CURDIR) PYTHONUNBUFFERED=1 python3 evaluation/gpu_check.py $(GPU_CHECK_ARGS)

clean:
	rm -rf runs .pytest_cache .ruff_cache
