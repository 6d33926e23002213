"""Training: applying the engine to whole models (``apply_fsdp``); the trainer comes here."""

from .apply_fsdp import apply_fsdp, decoder_blocks

__all__ = ["apply_fsdp", "decoder_blocks"]
