#!/usr/bin/env bash
# make gpu-check: the CUDA/NCCL tests and scalestack bench (vs FSDP2, FSDP1, DDP) on every GPU present (W = GPUs).
# Needs a CUDA build of torch: it uses .venv if its torch sees a GPU, else builds .venv-gpu with the default
# (CUDA) wheel of the pinned torch version.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  [ -x .venv-gpu/bin/python ] || python3 -m venv .venv-gpu
  .venv-gpu/bin/python -m pip install --quiet "torch==2.13.0" -e ".[dev]"
  PY=.venv-gpu/bin/python
fi
GPUS=$("$PY" -c "import torch; print(torch.cuda.device_count())")
[ "$GPUS" -ge 1 ] || { echo "gpu-check: no CUDA GPU visible" >&2; exit 1; }
echo "== CUDA/NCCL tests on $GPUS GPU(s)"
"$PY" -m pytest -q -m cuda tests/test_cuda.py
echo "== scalestack bench, W=$GPUS, NCCL"
"$PY" -m scalestack.cli.main bench --device cuda --world "$GPUS" --rounds 3 --steps 10 --out runs/bench-gpu
echo "== context parallelism, P=$GPUS: bf16 parity against unsharded flash attention, training tokens/s per GPU"
"$PY" -m torch.distributed.run --standalone --nproc_per_node="$GPUS" benchmarks/context_gpu.py
