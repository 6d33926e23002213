"""``scalestack.apply_fsdp``: shard a common architecture in one call, as torchtitan's parallelize functions
do for their models: each decoder block becomes a unit, then the root (embeddings, final norm, head; tied
embeddings stay together in it).

Blocks are found, in order: the classes a Hugging Face model names in ``_no_split_modules`` (its decoder
layers: Llama, Qwen2/3, Mistral, Mixtral, GPT-2, ...), then a ``ModuleList`` at a known place (``layers``,
``model.layers``, ``transformer.h``, ``h``, ``blocks``, ``model.decoder.layers``). Anything else gets an
error with the two lines to write by hand.
"""

from __future__ import annotations

from typing import Any

import torch.nn as nn

from ..fsdp.api import FSDPModule, fully_shard

_BLOCK_LISTS = ("layers", "model.layers", "transformer.h", "h", "blocks", "model.decoder.layers")


def _no_split_blocks(model: nn.Module) -> list[nn.Module]:
    names = set(getattr(model, "_no_split_modules", None) or ())
    if not names:
        return []
    found = [m for m in model.modules() if type(m).__name__ in names and m is not model]
    # outermost only: a block class nested in another block is part of it
    inner = {id(c) for m in found for c in m.modules() if c is not m}
    return [m for m in found if id(m) not in inner]


def _listed_blocks(model: nn.Module) -> list[nn.Module]:
    for path in _BLOCK_LISTS:
        node: Any = model
        for part in path.split("."):
            node = getattr(node, part, None)
        if isinstance(node, nn.ModuleList) and len(node) > 0:
            return list(node)
    return []


def decoder_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks ``apply_fsdp`` makes units of (empty when the architecture is not recognized)."""
    return _no_split_blocks(model) or _listed_blocks(model)


def apply_fsdp(model: nn.Module, **fully_shard_kwargs: Any) -> nn.Module:
    """``fully_shard`` every decoder block, then the model (the root), with the same keyword arguments
    (``mesh``, ``mp_policy``, ``reshard_after_forward``, ``granularity``, ...). Returns ``model``."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"apply_fsdp takes an nn.Module, got {type(model).__name__}")
    if isinstance(model, FSDPModule):
        raise ValueError(
            f"{type(model).__bases__[-1].__name__} was already passed to fully_shard; call apply_fsdp once"
        )
    blocks = decoder_blocks(model)
    if not blocks:
        raise ValueError(
            f"apply_fsdp does not recognize {type(model).__name__}: no Hugging Face _no_split_modules and no "
            f"ModuleList of blocks at {', '.join(_BLOCK_LISTS)}. Shard it by hand, blocks first:\n"
            "    for block in model.<your blocks>: scalestack.fully_shard(block)\n"
            "    scalestack.fully_shard(model)"
        )
    for block in blocks:
        fully_shard(block, **fully_shard_kwargs)
    fully_shard(model, **fully_shard_kwargs)
    return model


__all__ = ["apply_fsdp", "decoder_blocks"]
