"""What a sharded unit's modules put in and take from state dicts.

``state_dict()`` returns each sharded parameter as a ``PieceTensor`` (global shape, this rank's piece as a
view of the shard: no gather, no copy), whatever the module shows at the moment (FSDP2 shows its sharded
DTensors the same way); ``torch.distributed.checkpoint`` saves it as this rank's chunks of the global tensor.
``state_dict(keep_vars=True)`` still returns the registered parameter objects.

``load_state_dict()`` takes, for a sharded parameter: a ``PieceTensor`` of the same piece (what ``dcp.load``
filled in place), the full tensor (this rank's piece is copied out of it), or the plain piece that a
per-rank ``torch.save`` of ``state_dict()`` stored. A piece of another layout is refused with the fix. A unit
kept gathered between steps is resharded first, so the values loaded (by ``dcp.load`` before, or here)
reach its next forward.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .param import ManagedParam, shard_info
from .piece_tensor import PieceTensor
from .unit import ShardedUnit, ShardState, TrainingState

ASSIGN_REFUSED = (
    "load_state_dict(assign=True) would replace the sharded parameters under {where} and detach them from their "
    "shards; load with assign=False (the default), which copies in place"
)


def register_state_dict_hooks(unit: ShardedUnit) -> None:
    by_module: dict[nn.Module, list[tuple[str, ManagedParam]]] = {}
    for p in unit.params:
        for module, attr in p.uses:
            by_module.setdefault(module, []).append((attr, p))
    for module, entries in by_module.items():

        def save_hook(m: nn.Module, state_dict: dict, prefix: str, local_metadata: dict, entries=entries) -> None:
            for attr, p in entries:
                key = prefix + attr
                value = state_dict.get(key)
                if value is None or value is p.sharded or value is p.unsharded:  # keep_vars=True: the objects
                    continue
                state_dict[key] = PieceTensor(p.sharded.detach(), shard_info(p.sharded))

        def load_pre_hook(state_dict: dict, prefix: str, local_metadata: dict, strict: bool, missing_keys: list,
                          unexpected_keys: list, error_msgs: list, entries=entries) -> None:  # fmt: skip
            if local_metadata.get("assign_to_params_buffers"):
                raise RuntimeError(ASSIGN_REFUSED.format(where=prefix.rstrip(".") or "the root"))
            reshard_for_load([unit])
            for attr, p in entries:
                key = prefix + attr
                if key in state_dict:
                    local = _local_piece(key, state_dict[key], p, error_msgs)
                    if local is not None:
                        state_dict[key] = local

        module.register_state_dict_post_hook(save_hook)
        module._register_load_state_dict_pre_hook(load_pre_hook)


def reshard_for_load(units: list[ShardedUnit]) -> None:
    """Loading writes the sharded pieces: a unit kept gathered between steps is resharded first, so its next
    forward gathers the loaded values; a unit inside forward or backward refuses. Every rank loads, so every
    rank reshards the same units (a state dict taken on one rank must not: its next collectives would differ)."""
    for unit in units:
        if unit.state is ShardState.SHARDED:
            continue
        if unit.training_state not in (TrainingState.IDLE, TrainingState.POST_BACKWARD):
            raise RuntimeError(f"unit {unit.name!r} is inside forward or backward; load a state dict between steps")
        unit.reshard()


def _local_piece(key: str, value: object, p: ManagedParam, error_msgs: list[str]) -> torch.Tensor | None:
    """This rank's piece of ``value`` in the sharded parameter's shape, or None (with an error message)."""
    if not torch.is_tensor(value):
        error_msgs.append(f"{key!r} is a {type(value).__name__}, not a tensor")
        return None
    shape, local_shape = tuple(p.slot.shape), tuple(p.local_shape)
    if isinstance(value, PieceTensor):
        if tuple(value.shape) == shape and (value.start, value.end) == (p.piece.start, p.piece.end):
            return value.to_local().view(local_shape)
        error_msgs.append(
            f"{key!r} is a piece [{value.start}, {value.end}) of a {list(value.shape)} tensor, and this rank holds "
            f"[{p.piece.start}, {p.piece.end}) of {list(shape)}: it was sharded differently. Load checkpoints with "
            "torch.distributed.checkpoint.load(model.state_dict(), ...) or scalestack.checkpoint.load, which reshard"
        )
        return None
    if tuple(value.shape) == shape:  # the full tensor
        return p.in_global(value).view(local_shape)
    if tuple(value.shape) == local_shape:  # a per-rank torch.save of state_dict(): this rank's own piece
        return value
    error_msgs.append(
        f"size mismatch for {key}: the model's tensor has shape {list(shape)} (this rank's piece "
        f"{list(local_shape)}), the state dict's {list(value.shape)}"
    )
    return None
