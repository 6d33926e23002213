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
    head (a direct child of the model, or of its one wrapper such as ``model.`` in Hugging Face models,
    named ``lm_head``, ``head``, ``output``, ``classifier`` or ``score``), convolutions, norms, biases and
    empty tensors.
    Works before and after ``fully_shard`` (a piece keeps its tensor's number of dimensions).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"muon_param_groups takes an nn.Module, got {type(model).__name__}")
    embeddings = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters(recurse=False)}
    convolutions = {
        id(p) for m in model.modules() if isinstance(m, nn.modules.conv._ConvNd) for p in m.parameters(recurse=False)
    }
    muon: Named = []
    adamw: Named = []
    for name, p in model.named_parameters():
        shape = tuple(shard_info(p).global_shape) if is_sharded(p) else tuple(p.shape)  # the same on every rank
        modules = name.split(".")[:-1]
        is_head = len(modules) <= 2 and bool(modules) and modules[-1] in HEAD_NAMES
        is_embedding = id(p) in embeddings or "embed" in name
        matrix = len(shape) in (2, 3) and 0 not in shape and id(p) not in convolutions
        (muon if matrix and not is_head and not is_embedding else adamw).append((name, p))
    return muon, adamw
