"""Training: ``scalestack train`` (config, data, the loop in trainer) and ``apply_fsdp`` for whole models."""

from .apply_fsdp import apply_fsdp, decoder_blocks
from .shutdown import end_worker

__all__ = ["apply_fsdp", "decoder_blocks", "end_worker"]
