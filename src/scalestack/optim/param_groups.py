"""Which parameters Muon takes: the usual split of a model into Muon and AdamW parameters."""

from __future__ import annotations

import torch.nn as nn

from ..fsdp.param import is_sharded, shard_info

HEAD_NAMES = frozenset({"lm_head", "head", "output", "classifier", "score"})

Named = list[tuple[str, nn.Parameter]]


def muon_param_groups(model: nn.Module) -> tuple[Named, Named]:
    """``(muon, adamw)``: named parameters for ``Muon`` and for AdamW (or AdamW8bit).

    Muon gets the matrices (2-D) and expert stacks (3-D) of the blocks; AdamW gets everything else:
    embeddings (``nn.Embedding`` weights, tied heads included, and parameters named ``*embed*``), the output
    head (a module named ``lm_head``, ``head``, ``output``, ``classifier`` or ``score``), norms and biases.
    Works before and after ``fully_shard`` (a piece keeps its tensor's number of dimensions).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"muon_param_groups takes an nn.Module, got {type(model).__name__}")
    embeddings = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters(recurse=False)}
    muon: Named = []
    adamw: Named = []
    for name, p in model.named_parameters():
        ndim = len(shard_info(p).global_shape) if is_sharded(p) else p.dim()
        modules = name.split(".")[:-1]
        is_head = any(part in HEAD_NAMES for part in modules)
        is_embedding = id(p) in embeddings or "embed" in name
        (muon if ndim in (2, 3) and not is_head and not is_embedding else adamw).append((name, p))
    return muon, adamw
