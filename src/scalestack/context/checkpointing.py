"""Activation checkpointing that keeps the context-parallel attention's output (and log-sum-exp), so the
recomputation in backward reruns the block's matmuls but neither the attention nor its all-gather: the
forward's one all-gather per layer is not paid twice (LoongTrain's "Selective Checkpoint++").

The first forward records each attention's (out, lse) in a per-call stash; the recomputation replays them
in the same order. Everything else in the block is recomputed as under plain checkpointing.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

_mode: str | None = None
_stash: list[tuple[torch.Tensor, torch.Tensor]] | None = None


@contextlib.contextmanager
def _set(mode: str, stash: list) -> Iterator[None]:
    global _mode, _stash
    previous = _mode, _stash
    _mode, _stash = mode, stash
    try:
        yield
    finally:
        _mode, _stash = previous


def stash_mode() -> tuple[str | None, list | None]:
    """("record" | "replay" | None, the stash): read by the attention."""
    return _mode, _stash


def checkpoint_keeping_attention(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``torch.utils.checkpoint.checkpoint(fn, *args)`` (non-reentrant) that reuses the attention outputs."""
    stash: list = []
    contexts = lambda: (_set("record", stash), _set("replay", stash))  # noqa: E731
    return checkpoint(fn, *args, use_reentrant=False, context_fn=contexts, **kwargs)


def checkpoint_blocks(blocks: Iterable[nn.Module]) -> None:
    """Checkpoint each block's forward in place (same modules, same names), keeping attention outputs."""
    for block in blocks:
        forward = block.forward

        def run(*args: Any, _forward: Callable[..., Any] = forward, **kwargs: Any) -> Any:
            return checkpoint_keeping_attention(_forward, *args, **kwargs)

        block.forward = run
