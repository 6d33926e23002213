"""Gradient clipping over sharded parameters: the same global norm as unsharded clipping."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.distributed as dist
import torch.nn as nn

from ..fsdp.param import is_sharded, shard_info


def clip_grad_norm_(
    parameters: nn.Module | Iterable[torch.Tensor] | torch.Tensor,
    max_norm: float,
    norm_type: float = 2.0,
    error_if_nonfinite: bool = False,
    foreach: bool | None = None,
) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_`` for sharded parameters: the same global norm as unsharded clipping.

    Takes what torch's takes (parameters or a model). Sharded pieces are disjoint across ranks, so their
    contributions are summed (max for inf) with one all-reduce; parameters outside any unit are replicated
    and counted once. ``foreach`` is accepted for torch's signature.
    """
    if isinstance(parameters, nn.Module):
        params = list(parameters.parameters())
    elif torch.is_tensor(parameters):
        params = [parameters]
    elif isinstance(parameters, Iterable) and not isinstance(parameters, (str, bytes)):
        params = list(parameters)
    else:
        raise TypeError(f"clip_grad_norm_ takes parameters (or the model), got {type(parameters).__name__}")
    max_norm, norm_type = float(max_norm), float(norm_type)
    if max_norm < 0 or math.isnan(max_norm):
        raise ValueError(f"max_norm must be a non-negative number, got {max_norm}")
    if norm_type <= 0 or math.isnan(norm_type):
        raise ValueError(f"norm_type must be positive (or inf), got {norm_type}")
    sharded, replicated, group = [], [], None
    for p in params:
        if is_sharded(p):
            group = shard_info(p).group
        if p.grad is not None:
            (sharded if is_sharded(p) else replicated).append(p.grad)
    grads = sharded + replicated
    device = next((p.device for p in params), torch.device("cpu"))
    inf = math.isinf(norm_type)

    def reduce(gs: list[torch.Tensor]) -> torch.Tensor:
        acc = torch.zeros((), dtype=torch.float64, device=device)
        for g in gs:
            if g.numel() == 0:
                continue
            g = g.detach().double()
            acc = torch.maximum(acc, g.abs().max()) if inf else acc + g.abs().pow(norm_type).sum()
        return acc

    total = reduce(sharded)
    if group is not None:  # every rank reduces, even one whose pieces got no gradient
        dist.all_reduce(total, op=dist.ReduceOp.MAX if inf else dist.ReduceOp.SUM, group=group)
    local = reduce(replicated)
    total = torch.maximum(total, local) if inf else (total + local) ** (1.0 / norm_type)
    if error_if_nonfinite and not torch.isfinite(total):
        raise RuntimeError(f"the total norm of order {norm_type} of the gradients is non-finite ({total.item()})")
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for g in grads:
        g.detach().mul_(coef.to(g.dtype))
    return total.to(grads[0].dtype if grads else torch.float32)
