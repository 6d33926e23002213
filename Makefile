# Every target sets up what it needs: a .venv with the CPU wheel of torch pinned for dev and test.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_PIN := torch==2.13.0

.PHONY: setup test demo bench lint clean

$(BIN)/python:
	$(PY) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH_PIN)"
	$(BIN)/python -m pip install --quiet -e ".[dev]" "$(TORCH_PIN)"
	touch $@

setup: $(VENV)/.installed

test: setup
	$(BIN)/python -m pytest -q

demo: setup
	$(BIN)/torchrun --standalone --nproc_per_node=2 -m scalestack.train.demo

bench: setup
	$(BIN)/torchrun --standalone --nproc_per_node=2 benchmarks/step.py

lint: setup
	$(BIN)/python -m ruff check .

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info .pytest_cache
