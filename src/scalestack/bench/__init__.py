"""``scalestack bench``: one training step side by side with the systems users switch from (PyTorch FSDP2,
FSDP1, DDP, DeepSpeed ZeRO-3), the same model, data, optimizer and W, alternated in one run."""

from .runner import BenchResult, run_bench
from .systems import SYSTEMS, available

__all__ = ["SYSTEMS", "BenchResult", "available", "run_bench"]
