"""Full (unsharded) state dicts: keys and shapes exactly as the unsharded model's ``state_dict()``.

``model.state_dict()`` itself returns ``PieceTensor``s, this rank's pieces (see ``state_dict_hooks``).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn as nn

from . import collectives as comm
from .api import units
from .param import ManagedParam
from .state_dict_hooks import reshard_for_load
from .unit import ShardedUnit


def _owners(model: nn.Module) -> dict[int, tuple[ShardedUnit, ManagedParam]]:
    owners = {}
    for unit in units(model):
        for p in unit.params:
            owners[id(p.sharded)] = owners[id(p.unsharded)] = (unit, p)
    return owners


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Gather every unit (one all-gather per flat buffer, in the master dtype) and return full tensors.

    A collective: every rank must call it. Tied parameters share one tensor, as in ``state_dict()``.
    """
    owners = _owners(model)
    full: dict[int, torch.Tensor] = {}  # id(FlatBuffer) -> its gathered W*S elements
    for unit in units(model):
        for b in unit.buffers:
            out = torch.empty(b.layout.total_size, dtype=b.shard.dtype, device=b.shard.device)
            comm.all_gather_blocking(out, b.shard, unit.group)
            full[id(b)] = out
    result = {}
    for key, value in model.state_dict(keep_vars=True).items():
        if id(value) in owners:
            unit, p = owners[id(value)]
            result[key] = p.in_full(full[id(unit.buffers[p.buffer_index])])
        else:
            result[key] = value.detach()
    return result


def load_full_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor], strict: bool = True) -> None:
    """Copy each rank's pieces out of full tensors (no communication: every rank holds ``state_dict``)."""
    reshard_for_load(units(model))
    owners = _owners(model)
    expected = model.state_dict(keep_vars=True)
    if strict:
        missing = sorted(expected.keys() - state_dict.keys())
        unexpected = sorted(state_dict.keys() - expected.keys())
        if missing or unexpected:
            raise KeyError(
                f"state dict does not match the model: missing {missing[:8]}, unexpected {unexpected[:8]}; "
                "pass strict=False to load a subset"
            )
    with torch.no_grad():
        for key, target in expected.items():
            if key not in state_dict:
                continue
            source = state_dict[key]
            if not torch.is_tensor(source):
                raise TypeError(f"state dict entry {key!r} is a {type(source).__name__}, not a tensor")
            if id(target) in owners:
                _, p = owners[id(target)]
                shape = p.slot.shape
                if tuple(source.shape) != shape:
                    raise ValueError(f"{key!r}: the model has shape {list(shape)}, the state dict {list(source.shape)}")
                p.sharded.copy_(p.in_global(source).view(p.local_shape))
            else:
                if source.shape != target.shape:
                    raise ValueError(
                        f"{key!r}: the model has shape {list(target.shape)}, the state dict {list(source.shape)}"
                    )
                target.copy_(source)
