"""Activation checkpointing that keeps the context-parallel attention's output (and log-sum-exp), so the
recomputation in backward reruns the block's matmuls but neither the attention nor its all-gather: the
forward's one all-gather per layer is not paid twice (LoongTrain's "Selective Checkpoint++").

The first forward records each attention's (out, lse) in a per-call stash; the recomputation replays them
in the same order (checked: shape, dtype and device must match). The mode is per thread, as autograd's
engine may run a recomputation on its own thread.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

_state = threading.local()


class _Mode:
    """A context manager that can be entered again (a second backward recomputes again)."""

    def __init__(self, mode: str, stash: list) -> None:
        self.mode, self.stash = mode, stash

    def __enter__(self) -> None:
        self.previous = getattr(_state, "mode", None), getattr(_state, "stash", None)
        _state.mode, _state.stash = self.mode, (self.stash if self.mode == "record" else list(self.stash))

    def __exit__(self, *exc: object) -> None:
        _state.mode, _state.stash = self.previous


def stash_mode() -> tuple[str | None, list | None]:
    """("record" | "replay" | None, the stash): read by the attention."""
    return getattr(_state, "mode", None), getattr(_state, "stash", None)


@torch._dynamo.disable  # checkpoint's context_fn is not traceable: compiled blocks call this eagerly
def checkpoint_keeping_attention(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``torch.utils.checkpoint.checkpoint(fn, *args)`` (non-reentrant) that reuses the attention outputs."""
    stash: list = []
    contexts = lambda: (_Mode("record", stash), _Mode("replay", stash))  # noqa: E731
    return checkpoint(fn, *args, use_reentrant=False, context_fn=contexts, **kwargs)


def checkpoint_blocks(blocks: Iterable[nn.Module]) -> None:
    """Checkpoint each block's forward in place (same modules, same names), keeping attention outputs."""
    for block in blocks:
        forward = block.forward

        def run(*args: Any, _forward: Callable[..., Any] = forward, **kwargs: Any) -> Any:
            return checkpoint_keeping_attention(_forward, *args, **kwargs)

        block.forward = run
