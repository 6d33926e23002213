# Every target sets up what it needs: a .venv with the CPU wheel of torch pinned for dev and test.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_PIN := torch==2.13.0

.PHONY: setup test demo retrieval-demo bench serve-bench diffusion-bench gpu-check lint clean

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

# The main job on a shipped config: a byte-level GPT on the shipped text, 2 local ranks (~2 minutes).
demo: setup
	$(BIN)/scalestack train configs/demo.toml --nproc 2

# Train a generative retriever with scalestack FSDP (2 ranks), then serve it under two allowed sets.
retrieval-demo: setup
	OMP_NUM_THREADS=1 $(BIN)/torchrun --standalone --nproc_per_node=2 examples/retrieval/demo.py --out runs/retrieval
	head -6 runs/retrieval/queries.tsv | $(BIN)/scalestack retrieve --checkpoint runs/retrieval/retriever.pt --allowed runs/retrieval/fresh.ids
	head -6 runs/retrieval/queries.tsv | $(BIN)/scalestack retrieve --checkpoint runs/retrieval/retriever.pt --allowed runs/retrieval/items.ids

# scalestack vs FSDP2, FSDP1, DDP (and DeepSpeed ZeRO-3 when installed) on the reference GPT at W=2 and 4.
bench: setup
	$(BIN)/python -m pip install --quiet -e ".[dev,bench]" "$(TORCH_PIN)"
	$(BIN)/scalestack bench --world 2,4 --out runs/bench

# Agent loops against scalestack serve: TTFT and latency per turn, full resend vs KV reuse (~12 minutes).
serve-bench: setup
	$(BIN)/python benchmarks/serve_turns.py --out runs/serve-bench

# Step caches (none, FORA, TeaCache, MagCache, SenCache) on a DiT trained here: speedup vs quality (~25 minutes).
diffusion-bench: setup
	$(BIN)/python benchmarks/diffusion_cache.py --run-dir runs/dit --out runs/diffusion-bench

# On a machine with GPUs: CUDA/NCCL tests and the step benchmark against FSDP2 (W = number of GPUs).
gpu-check:
	bash scripts/gpu_check.sh

lint: setup
	$(BIN)/python -m ruff check .

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info .pytest_cache
