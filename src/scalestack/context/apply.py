"""``apply_context_parallel(model, group)``: make a Hugging Face decoder (Llama, Qwen, Mistral, ... and the
trainer's Llama sizes, which are Hugging Face Llamas) run its attention context-parallel, unchanged otherwise
(for training: it turns the model's KV cache off).

It registers our attention as a Transformers attention implementation and switches the model to it; the
model then takes this rank's shard of ``input_ids`` and ``position_ids`` (global positions, so RoPE is right)
and, for packed sequences, ``cp_document_ids`` (the whole sequence's document ids) and ``cp_layout`` (when the
shards follow ``document_head_tail_layout``) as keywords. Padding is a document of its own, with ignored
labels: an ``attention_mask`` with zeros is refused, since Transformers builds none for this attention.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed import ProcessGroup

from .attention import Kernel, context_parallel_attention

IMPLEMENTATION = "scalestack_context_parallel"


def _attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
               **kwargs: Any) -> tuple[torch.Tensor, None]:  # fmt: skip
    group = getattr(module, "_context_parallel_group", None)
    if group is None:
        raise RuntimeError(f"{type(module).__name__} runs the context-parallel attention but has no group: call "
                           "apply_context_parallel(model, group) on the whole model")  # fmt: skip
    if dropout:
        raise ValueError("context-parallel attention has no dropout: set the model's attention_dropout to 0")
    if getattr(module, "sliding_window", None):
        raise ValueError("sliding-window attention is not supported under context parallelism")
    out, _ = context_parallel_attention(query, key, value, group, causal=getattr(module, "is_causal", True),
                                        document_ids=kwargs.get("cp_document_ids"), scale=scaling,
                                        layout=kwargs.get("cp_layout"),
                                        kernel=getattr(module, "_context_parallel_kernel", None))  # fmt: skip
    return out.transpose(1, 2).contiguous(), None


def _check_inputs(module: nn.Module, args: tuple, kwargs: dict) -> None:
    """Refuse what would be silently wrong on a shard: a padding mask (Transformers builds none for this
    attention), local positions for RoPE, and Transformers' own loss (it shifts labels inside the shard and
    averages per rank)."""
    try:
        bound = module._context_parallel_signature.bind_partial(*args, **kwargs).arguments
    except TypeError:
        return  # the model's own error says what is wrong
    mask = bound.get("attention_mask")
    if isinstance(mask, torch.Tensor) and not bool(mask.bool().all()):
        raise ValueError(
            "context-parallel attention takes no attention_mask with padding: pack the padding as its "
            "own document (cp_document_ids = document_ids(cu_seqlens, N)) with ignored labels"
        )
    if bound.get("labels") is not None:
        raise ValueError(
            "under context parallelism Transformers' loss would shift labels inside this rank's shard and average "
            "per rank: shift labels on the whole sequence, shard them, and use chunked_cross_entropy with "
            "global_mean_loss"
        )
    group = getattr(module, "_context_parallel_group", None)
    if bound.get("position_ids") is None and group is not None and dist.get_world_size(group) > 1:
        raise ValueError(
            "pass position_ids, this rank's shard of the global positions (shard_sequence(torch.arange(N)[None], "
            "P, rank)): without them RoPE would see local positions"
        )


def apply_context_parallel(model: nn.Module, group: ProcessGroup, *, kernel: Kernel | None = None) -> nn.Module:
    """Switch ``model`` (a Transformers model) to context-parallel attention over ``group``; returns it.
    ``kernel``: the local attention step (``context_parallel_attention``'s default: ``FLASH``)."""
    try:
        from transformers import AttentionInterface, PreTrainedModel
    except ImportError:
        raise ImportError("apply_context_parallel works on Transformers models: pip install transformers") from None
    if not isinstance(model, PreTrainedModel):
        raise TypeError(f"apply_context_parallel takes a Transformers model, got {type(model).__name__}")
    if not isinstance(group, ProcessGroup):
        raise TypeError(f"group must be the context-parallel ProcessGroup (of a DeviceMesh: mesh['cp'].get_group()), "
                        f"got {group!r}")  # fmt: skip
    AttentionInterface.register(IMPLEMENTATION, _attention)
    attention_modules = [m for m in model.modules() if hasattr(m, "is_causal") and hasattr(m, "scaling")]
    if not attention_modules:
        raise ValueError(f"no attention module found in {type(model).__name__}")
    for m in attention_modules:
        m._context_parallel_group = group
        m._context_parallel_kernel = kernel
    model.set_attn_implementation(IMPLEMENTATION)
    for m in model.modules():
        if isinstance(m, PreTrainedModel):
            m._context_parallel_group = group
            m._context_parallel_signature = inspect.signature(m.forward)  # once, not on every forward
            m.register_forward_pre_hook(_check_inputs, with_kwargs=True)
    model.config.use_cache = False  # training: a KV cache would also grow again under checkpoint recomputation
    return model
